"""Grad-CAM heat maps (the `grad-cam` package) for test images, at the layer the model registry names.

The heat maps are computed on a private fp32 CPU copy of the model, whatever device, precision and
memory format the measurement ran with: autocast would change the gradients Grad-CAM weights the
activations with, and 32x32 images cost nothing on a CPU. Models take uint8-range images
(normalisation is their first layer), so the images go in unnormalised.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cifarlab.models import model_spec
from cifarlab.models.classifier import Classifier


def cam_model(model: Classifier) -> Classifier:
    """A copy of `model` on the CPU, fp32, contiguous, eval mode, with no in-place ReLU (an in-place op
    after the hooked layer would overwrite the activation whose gradient Grad-CAM reads)."""
    copied = copy.deepcopy(model).to("cpu", dtype=torch.float32).to(memory_format=torch.contiguous_format)
    for module in copied.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return copied.eval()


def cam_layer_name(model: Classifier) -> str:
    return model_spec(model.arch).cam_layer


def grad_cam(model: Classifier, images: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM of `classes[i]` for `images[i]` (uint8 HWC [N, 32, 32, 3]) at `model.cam_layer()`.

    Returns float32 [N, 32, 32] heat maps, each scaled to [0, 1] (1 = the region that raised that
    class's logit most). `model` is not modified.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(images) == 0:
        return np.zeros((0,) + images.shape[1:3], dtype=np.float32)
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} target classes")
    net = cam_model(model)
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()   # uint8 range, NCHW
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with torch.autocast("cpu", enabled=False), GradCAM(model=net, target_layers=[net.cam_layer()]) as cam:
        heat = cam(input_tensor=batch, targets=targets)
    return np.asarray(heat, dtype=np.float32)
