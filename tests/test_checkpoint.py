import pytest
import torch

from cifarlab.engine.checkpoint import load_checkpoint, save_checkpoint
from cifarlab.engine.classifier import Classifier
from cifarlab.errors import CifarlabError


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


# --- the background writer of the resume state ----------------------------------------------------

def test_state_writer_writes_the_state_as_it_was_when_saved(tmp_path):
    """The loop goes on changing the weights in place while the file is written: the file holds the
    values of the moment `save` was called, every time (the copy buffers are reused)."""
    import random

    from cifarlab.engine.checkpoint import StateWriter

    model = Classifier("a7_net")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    writer = StateWriter()
    for epoch in (1, 2):
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "lrs": [0.1] * epoch}
        expected = {name: value.clone() for name, value in model.state_dict().items()}
        writer.save(tmp_path / "state.pt", state)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)           # the next epoch's steps, while the file is written
        writer.wait()
        saved = torch.load(tmp_path / "state.pt", weights_only=False)
        assert saved["epoch"] == epoch and saved["lrs"] == [0.1] * epoch
        assert saved["rng"]["python"] == state["rng"]["python"]
        for name, value in expected.items():
            assert torch.equal(saved["model"][name], value), name
        assert saved["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert len(writer.seconds) == 2 and [p.name for p in tmp_path.iterdir()] == ["state.pt"]   # no temporary left


def test_state_writer_reports_a_failed_write_in_one_line(tmp_path):
    from cifarlab.engine.checkpoint import StateWriter

    (tmp_path / "file").write_text("not a directory")
    writer = StateWriter()
    writer.save(tmp_path / "file" / "state.pt", {"x": torch.zeros(3)})
    with pytest.raises(CifarlabError, match="cannot write the training state .*state.pt") as err:
        writer.wait()
    assert "\n" not in str(err.value)
    writer.wait()                              # reported once
