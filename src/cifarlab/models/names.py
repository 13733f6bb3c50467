"""The registered networks' names, known without importing torch or any network.

`model.name` is checked against these when params load, so an unknown name fails before any work
starts, and the stages that never build a model (download, max_lr) depend on this file alone, not
on the networks. A model's name is its module's name in this package: keep one name per file here.
"""

FAMILIES = ("custom_resnet", "a7_net", "custom_resnet_a8", "resnet18", "fast_net")

# The networks with a frozen whitening conv whose bias trains (`optim.whiten_bias_epochs`): name -> that
# conv's dotted path. Params are checked against it when they load, so it lives here, beside the names.
WHITENING = {"fast_net": "whiten"}


def model_names() -> list[str]:
    return sorted(FAMILIES)
