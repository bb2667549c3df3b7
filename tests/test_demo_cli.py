import subprocess
import sys

import pytest

from pmoe.cli import main
from pmoe.demo import run_demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    result = run_demo(output_dir=str(tmp_path / "demo"), steps_per_task=3)
    assert result["conversion_diff"] == 0.0
    assert result["identical_after_reload"]
    assert [len(row) for row in result["accuracy_matrix"]] == [1, 2, 3]
    assert (tmp_path / "demo" / "modeling_pmoe.py").exists()
    assert "reloaded with AutoModelForCausalLM" in capsys.readouterr().out


def test_cli_help_and_errors():
    help_text = subprocess.run(
        [sys.executable, "-m", "pmoe", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--steps-per-task" in help_text
    with pytest.raises(SystemExit) as error:
        main(["demo", "--steps-per-task", "0"])
    assert error.value.code == 2
