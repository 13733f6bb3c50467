import pytest
import torch

from cifarlab.checkpoint import load_checkpoint, save_checkpoint
from cifarlab.errors import CifarlabError
from cifarlab.models.classifier import Classifier


def test_round_trip_describes_itself(tmp_path):
    model = Classifier("a7_net")
    save_checkpoint(tmp_path / "m.pt", model, epoch=3, params={"x": 1})
    loaded, info = load_checkpoint(tmp_path / "m.pt")
    assert info["arch"] == "a7_net" and info["epoch"] == 3 and info["params"] == {"x": 1}
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_missing(tmp_path):
    with pytest.raises(CifarlabError, match="does not exist; run `dvc repro train`"):
        load_checkpoint(tmp_path / "none.pt")


def test_truncated(tmp_path):
    save_checkpoint(tmp_path / "m.pt", Classifier("a7_net"))
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CifarlabError, match="unreadable \\(truncated or not a checkpoint\\)") as err:
        load_checkpoint(tmp_path / "m.pt")
    assert "\n" not in str(err.value)


def test_weights_of_another_architecture(tmp_path):
    state = {"arch": "custom_resnet", "state_dict": Classifier("a7_net").state_dict()}
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(CifarlabError, match="does not fit architecture `custom_resnet`"):
        load_checkpoint(tmp_path / "m.pt")


def test_unknown_architecture(tmp_path):
    torch.save({"arch": "vgg99", "state_dict": {}}, tmp_path / "m.pt")
    with pytest.raises(CifarlabError, match="unknown model `vgg99`"):
        load_checkpoint(tmp_path / "m.pt")


def test_equal_weights_give_equal_bytes(tmp_path):
    """The temporary file's random name must not reach the archive: DVC hashes the bytes."""
    import hashlib

    torch.manual_seed(0)
    model = Classifier("a7_net")
    save_checkpoint(tmp_path / "a" / "model.pt", model, epoch=3)
    save_checkpoint(tmp_path / "b" / "other-name.pt", model, epoch=3)
    digests = {hashlib.md5((tmp_path / p).read_bytes()).hexdigest() for p in ("a/model.pt", "b/other-name.pt")}
    assert len(digests) == 1
