"""bench/throughput.py runs end to end on a tiny synthetic set and reports both augmentation paths
(it asserts nothing about speed: the numbers depend on the machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, run, run_script


def test_bench_reports_both_augmentation_paths(tmp_path):
    out = tmp_path / "bench.json"
    run_script(REPO, "bench/throughput.py", "--batches", "1", "--warmup", "1", "--batch-size", "32",
               "--eval-images", "32", "--skip-reference", "--both-augment-paths", "--json", str(out), timeout=600)
    result = json.loads(out.read_text())
    for key in ("loader_per_image_images_per_s", "loader_batch_images_per_s", "pipeline_train_images_per_s",
                "other_augment_path_train_images_per_s", "eval_images_per_s"):
        assert result[key] > 0, key
    assert result["augment_path"] == "per_image (augment.path)" and result["other_augment_path"] == "batch"
    assert result["loader_images_per_s"] == result["loader_per_image_images_per_s"]
    # the measurement renders as a row of bench/RESULTS.md
    results = tmp_path / "results"
    results.mkdir()
    out.rename(results / "2026-11-27-test.json")
    page = tmp_path / "RESULTS.md"
    run([sys.executable, "bench/results.py", "--results", str(results), "--page", str(page)], REPO)
    [row] = [line for line in page.read_text().splitlines() if line.startswith("| [2026-11-27-test]")]
    assert f"| `{result['model']}`, 32 |" in row and f"| {result['pipeline_train_images_per_s']:.1f} |" in row


def test_results_page_is_generated_from_the_result_files():
    result = run([sys.executable, "bench/results.py", "--check"], REPO, check=False)
    assert result.returncode == 0, result.stderr


def test_quick_budget_results_render_one_row_per_preset(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import results as bench_results

    runs = [{"preset": "assignment7", "wall_seconds": 26.04, "cpu_seconds": 40.0, "load_before": 0.5,
             "load_after": 1.2, "ok": True, "test_accuracy": 0.39, "max_lr": 0.0149},
            {"preset": "session11", "wall_seconds": 3.0, "cpu_seconds": 2.0, "load_before": 1.2,
             "load_after": 1.3, "ok": False, "error": "error: boom"}]
    (tmp_path / "a.json").write_text(json.dumps({"bench": "quick_budget", "date": "2026-11-27 00:00 UTC",
                                                 "cpu": "Test CPU", "cpu_count": 2, "threads": "default",
                                                 "runs": runs}))
    page = bench_results.render(tmp_path)
    assert "| [a](results/a.json) | 2026-11-27 00:00 UTC | Test CPU, 2 cores | default | `assignment7` | 26.0 | 40.0 " \
           "| 0.5 -> 1.2 | 0.390 |" in page
    assert "| `session11` | 3.0 | 2.0 | 1.2 -> 1.3 | failed |" in page
    (tmp_path / "b.json").write_text("{}")
    try:
        bench_results.render(tmp_path)
    except SystemExit as err:
        assert "b.json: not a result of bench/throughput.py or bench/quick_budget.py" in str(err)
    else:
        raise AssertionError("a file that is no result was accepted")


def _full_run_workspace(tmp_path, preset: str, **changes) -> Path:
    """A workspace as `dvc exp run -S preset=<preset>` on real images leaves it: the composed params
    (with `changes`, section -> {key: value}) and the three metrics files bench/full_run.py reads."""
    import yaml

    from conftest import composed, merge, write_params

    params = merge(composed([f"preset={preset}"]), {"data": {"source": "cifar10"}, **changes})
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_params(tmp_path, params)
    epochs = params["train"]["epochs"]
    (tmp_path / "metrics").mkdir()
    for name, value in {"test.json": {"accuracy": 0.9012, "loss": 0.3, "tta_translate": {"accuracy": 0.9105, "loss": 0.29}},
                        "training.json": {"max_lr": 0.24, "epochs": epochs, "images_per_second": 400.0},
                        "train_speed.json": {"epoch_seconds": [100.0] * epochs, "images_per_second": 400.0,
                                             "device": "cpu", "threads": 2}}.items():
        (tmp_path / "metrics" / name).write_text(json.dumps(value))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["report"]["preset"] == preset
    return tmp_path


def test_a_full_run_is_recorded_and_shows_in_the_preset_table_and_results_page(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import full_run
    import results as bench_results

    from cifarlab.config import preset_table

    results = tmp_path / "results"
    results.mkdir()
    for seed, accuracy in ((1, 0.9012), (2, 0.8990)):
        work = _full_run_workspace(tmp_path / f"w{seed}", "fast_muon", train={"seed": seed})
        test = json.loads((work / "metrics/test.json").read_text()) | {"accuracy": accuracy}
        (work / "metrics/test.json").write_text(json.dumps(test))
        assert full_run.main(["--workspace", str(work), "--json", str(results / f"run-{seed}.json")]) == 0
    recorded = json.loads((results / "run-1.json").read_text())
    assert recorded["preset"] == "fast_muon" and recorded["seed"] == 1 and recorded["train_seconds"] == 800.0
    rows = {line.split(" | ")[0]: line for line in preset_table.table(REPO / "conf", results).splitlines()}
    assert rows["| `fast_muon`"].endswith("| [90.01%, flip + translate TTA (6 views) 91.05%](bench/RESULTS.md#full-runs)"
                                          " (2 runs, 8 epochs, real images) |")
    assert rows["| `assignment7`"].endswith("| none yet |")
    page = bench_results.render(results)
    assert "| `fast_muon` | 2 | 8 | 89.90 | flip + translate TTA (6 views) 91.05 | 800 | 400 |" in page


def test_a_run_that_is_not_the_presets_full_run_is_refused_in_one_line(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import full_run

    cases = {"synthetic": ({"data": {"source": "synthetic"}}, "data.source is `synthetic`"),
             "epochs": ({"train": {"epochs": 1}}, "differs from preset `fast_muon` in train.epochs 1 (preset 8)"),
             "quick": ({"budget": {"name": "quick"}}, "budget is `quick`")}
    for name, (changes, message) in cases.items():
        work = _full_run_workspace(tmp_path / name, "fast_muon", **changes)
        with pytest.raises(SystemExit) as stop:
            full_run.main(["--workspace", str(work), "--json", str(tmp_path / f"{name}.json")])
        assert str(stop.value).startswith("error: ") and message in str(stop.value), name
        assert not (tmp_path / f"{name}.json").exists()
