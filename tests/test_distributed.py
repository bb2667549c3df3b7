import json
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("router_keys", ["gaussian", "lda"])
def test_one_trainer_per_task_under_torchrun_on_two_cpu_processes(tmp_path, router_keys):
    script = os.path.join(os.path.dirname(__file__), "processes", "continual_ddp.py")
    report_path = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()),
         script, str(report_path), router_keys],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(report_path.read_text())
    assert [task["experts"] for task in report["tasks"]] == [["task-0"], ["task-0", "task-1"]]
    for task in report["tasks"]:
        assert task["world_size"] == 2
        assert task["same_on_every_rank"]
        assert task["earlier_experts_untouched"]
        assert task["base_untouched"]
        assert task["new_expert_trained"]
        # Before the first step each process fitted the key on its half of the task's 16 examples (fewer than
        # router_fit_sequences); the callback summed both processes' fits.
        assert task["key_count"] == 16
