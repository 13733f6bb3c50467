"""The training loader keeps its workers across epochs and still gives each epoch the batches and
augmentations of (seed, epoch) alone; the test split can be held on the device once."""

from __future__ import annotations

import pytest
import torch

from cifarlab.config.params import parse_params
from cifarlab.data.loaders import GlobalBatchSampler, iterate_batches, ResidentBatches, train_loader
from cifarlab.data.sources import make_synthetic
from cifarlab.engine.runtime import Runtime
from conftest import merge

SEED = 4


def cpu_runtime(num_workers: int) -> Runtime:
    return Runtime(torch.device("cpu"), "fp32", False, num_workers)


@pytest.fixture(scope="module")
def split():
    return make_synthetic(80, 10, 0).train     # 3 batches of 32: the last one short


@pytest.fixture
def augment(default_params):
    return parse_params(merge(default_params, {"augment": {"cutout_p": 0.5}})).augment


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)


def fresh_epoch(split, augment, epoch: int, num_workers: int):
    """Epoch `epoch` from a loader made for it alone (new workers, or none), as before persistent workers."""
    loader = train_loader(split, augment, 32, SEED, cpu_runtime(num_workers))
    try:
        return batches_of(loader.epoch(epoch))
    finally:
        loader.close()


def test_persistent_workers_give_each_epoch_the_batches_of_a_fresh_loader(split, augment):
    loader = train_loader(split, augment, 32, SEED, cpu_runtime(2))
    persistent = {}
    pids = []
    for epoch in (1, 2, 3):
        persistent[epoch] = batches_of(loader.epoch(epoch))
        pids.append(sorted(w.pid for w in loader.loader._iterator._workers))   # the DataLoader's own workers
    loader.close()
    assert pids[0] == pids[1] == pids[2], "workers were restarted between epochs"
    for epoch in (1, 2, 3):
        assert_same(persistent[epoch], fresh_epoch(split, augment, epoch, num_workers=0))
        assert_same(persistent[epoch], fresh_epoch(split, augment, epoch, num_workers=1))
    # and the epochs differ from each other: order and augmentation both follow the epoch
    assert not torch.equal(persistent[1][0][1], persistent[2][0][1])
    assert sum(len(labels) for _, labels in persistent[1]) == len(split)


def test_each_image_is_augmented_for_its_epoch_in_persistent_workers(split, augment):
    """The epoch reaches the workers inside the indices: the same image differs between epochs."""
    loader = train_loader(split, augment, len(split), SEED, cpu_runtime(1))
    images = {}
    for epoch in (1, 2):
        [(batch, _)] = batches_of(loader.epoch(epoch))
        order = list(loader.sampler.batches(epoch))[0]
        images[epoch] = batch[order.index(0)]           # image 0 of the split, wherever it landed
    loader.close()
    direct = loader.dataset
    assert torch.equal(images[1], direct[(1, 0)][0]) and torch.equal(images[2], direct[(2, 0)][0])
    assert not torch.equal(images[1], images[2])


def test_an_epoch_left_half_done_does_not_leak_into_the_next(split, augment):
    """A pass that stops early (the LR range test, the benchmark) and a next epoch started before the
    current one is used up still give the next epoch exactly its own batches."""
    loader = train_loader(split, augment, 32, SEED, cpu_runtime(2))
    next(iter(loader.epoch(1)))                  # one batch of epoch 1, the workers still busy with it
    second = batches_of(loader.epoch(2))
    loader.close()
    assert_same(second, fresh_epoch(split, augment, 2, num_workers=0))


def test_starting_an_epoch_does_not_draw_from_the_global_rng(split, augment):
    """A fresh DataLoader iterator draws a base seed from torch's global RNG and a persistent one does
    not: the loader's private generator keeps dropout's stream the same whether or not a run resumed."""
    loader = train_loader(split, augment, 32, SEED, cpu_runtime(1))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch in (1, 2):
        batches_of(loader.epoch(epoch))
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)


def test_a_closed_loader_says_so(split, augment):
    from cifarlab.errors import CifarlabError

    loader = train_loader(split, augment, 32, SEED, cpu_runtime(0))
    loader.close()
    with pytest.raises(CifarlabError, match="closed"):
        loader.epoch(1)


def test_resident_batches_are_the_plain_batches_every_pass(split):
    resident = ResidentBatches(split, 32, torch.device("cpu"))
    assert len(resident) == 3
    plain = list(iterate_batches(split, 32))
    for _ in range(2):                                         # re-iterable: one copy serves every epoch
        assert_same(list(resident), plain)
    images, _ = next(iter(resident))
    assert images.shape == (32, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", ["per_image", "batch"])
def test_drop_last_ends_every_epoch_on_a_full_batch(split, augment, path):
    """train.drop_last: 80 images in batches of 32 give 2 full batches (the 16 left over wait for the
    next shuffle), from the same shuffle as without it; on both augmentation paths."""
    runtime = cpu_runtime(0)
    kept = train_loader(split, augment, 32, SEED, runtime, path=path)
    dropped = train_loader(split, augment, 32, SEED, runtime, path=path, drop_last=True)
    try:
        assert (len(kept), len(dropped)) == (3, 2)
        for epoch in (1, 2):
            full, short = batches_of(kept.epoch(epoch)), batches_of(dropped.epoch(epoch))
            assert [len(labels) for _, labels in short] == [32, 32]
            assert_same(short, full[:2])
    finally:
        for loader in (kept, dropped):
            getattr(loader, "close", lambda: None)()


def test_drop_last_in_a_distributed_run_drops_the_same_global_batch():
    single = list(GlobalBatchSampler(100, 32, seed=3, drop_last=True))
    shards = [list(GlobalBatchSampler(100, 32, seed=3, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert len(single) == 3 and all(len(batch) == 32 for batch in single)
    assert [a + b for a, b in zip(*shards)] == single
