import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_speed_benchmark_quick_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick", "--repeats", "1", "--no-memory",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "speed-quick.json").read_text())
    assert {"pmoe-1-dense", "pmoe-4-dense", "pmoe-4-top2"} <= set(results["inference"])
    assert all(row["prefill_ratio"] > 0 for row in results["inference"].values())
    assert {"full-finetuning", "peft-lora-all-layers", "pmoe"} <= set(results["training"])
    assert results["per_task"]["parameters_added"] > 0
    assert "| pmoe-4-top2 |" in (tmp_path / "speed-quick.md").read_text()


def test_speed_benchmark_memory_case_runs():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick", "--memory-case", "train:pmoe"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["case"] == "train:pmoe" and isinstance(report["peak_bytes"], int)


def test_continual_benchmark_quick_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "continual.py"), "--quick", "--methods", "pmoe",
         "sequential-lora", "multitask", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "continual-quick.json").read_text())
    assert set(results["summary"]) == {"pmoe", "sequential-lora", "multitask"}
    for method in results["summary"].values():
        assert {"LA", "OP", "BWT", "FWT", "trainable_per_task", "added_per_task"} <= set(method)
    assert (tmp_path / "continual-quick.png").exists()
    assert "| pmoe |" in (tmp_path / "continual-quick.md").read_text()
