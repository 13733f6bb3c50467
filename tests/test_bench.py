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
