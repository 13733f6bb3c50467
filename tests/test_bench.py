"""bench/throughput.py runs end to end on a tiny synthetic set and reports both augmentation paths
(it asserts nothing about speed: the numbers depend on the machine)."""

from __future__ import annotations

import json
import sys

from conftest import REPO, run


def test_bench_reports_both_augmentation_paths(tmp_path):
    out = tmp_path / "bench.json"
    run([sys.executable, "bench/throughput.py", "--batches", "1", "--warmup", "1", "--batch-size", "32",
         "--eval-images", "32", "--skip-reference", "--both-augment-paths", "--json", str(out)], REPO, timeout=600)
    result = json.loads(out.read_text())
    for key in ("loader_per_image_images_per_s", "loader_batch_images_per_s", "pipeline_train_images_per_s",
                "other_augment_path_train_images_per_s", "eval_images_per_s"):
        assert result[key] > 0, key
    assert result["augment_path"] == "per_image (augment.path)" and result["other_augment_path"] == "batch"
    assert result["loader_images_per_s"] == result["loader_per_image_images_per_s"]
