import subprocess
import sys

import pytest

from pmoe.cli import main
from pmoe.demo import run_demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    result = run_demo(output_dir=str(tmp_path / "demo"), steps_per_task=2, pretrain_steps=3, train_examples=64,
                      test_examples=8, cache_dir=str(tmp_path / "cache"))
    assert result["conversion_diff"] == 0.0
    assert result["identical_after_reload"]
    for method in result["methods"].values():
        assert [len(row) for row in method["matrix"]] == [4, 4, 4, 4]
        assert {"LA", "OP", "BWT", "FWT"} <= set(method["metrics"])
    assert (tmp_path / "demo" / "continual_learning.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "pmoe-model" / "modeling_pmoe.py").exists()
    assert (tmp_path / "cache" / "demo-base-v1-3" / "model.safetensors").exists()  # cached for the next run
    output = capsys.readouterr().out
    assert "sequential fine-tuning: exact match" in output and "reloaded in a fresh process without pmoe" in output


def test_cli_help_and_errors():
    help_text = subprocess.run(
        [sys.executable, "-m", "pmoe", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--steps-per-task" in help_text
    with pytest.raises(SystemExit) as error:
        main(["demo", "--steps-per-task", "0"])
    assert error.value.code == 2
