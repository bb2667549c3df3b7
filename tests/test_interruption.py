"""Nothing is lost when continual training is killed (SIGKILL, in a child process): between checkpoints, in the middle
of the checkpoint a task boundary writes, and in the middle of `save_pretrained` at a task boundary. Each resumed run
ends with the same tensors, tasks and step counts as an uninterrupted one."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

import pmoe
from pmoe import PMoEForCausalLM

from processes.continual_child import kill_at_marker, run_schedule, run_tasks, start_child


@pytest.fixture(autouse=True)
def one_thread():
    """The child runs on one torch thread; so do the runs compared with it (bit-identical results need the same
    thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_model(model, expected):
    assert model.config.expert_tasks == expected.config.expert_tasks
    assert model.config.expert_train_steps == expected.config.expert_train_steps
    reference = expected.state_dict()  # experts, router keys and statistics, usage counters, base weights
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def killed_child(tmp_path, *arguments):
    marker, log = tmp_path / "paused", tmp_path / "child.log"
    out = tmp_path / "out"
    kill_at_marker(start_child(out, *arguments, "--marker", marker, log=log), marker, log)
    return out


def test_killed_between_checkpoints_of_a_task_schedule(tmp_path):
    # Killed at step 3 (checkpoints every 2 steps, task boundary after step 4): the resumed run crosses the boundary.
    out = killed_child(tmp_path, "--mode", "schedule", "--pause-at-step", 3)
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    checkpoint = pmoe.last_complete_checkpoint(out)
    assert checkpoint == get_last_checkpoint(out) == str(out / "checkpoint-2")

    model = PMoEForCausalLM.from_pretrained(checkpoint)
    assert model.config.expert_tasks == ["task-0"] and model.config.expert_train_steps == [2]
    resumed = run_schedule(out, model, resume=checkpoint)
    assert resumed.config.expert_tasks == ["task-0", "task-1"] and resumed.config.expert_train_steps == [4, 4]
    assert_same_model(resumed, run_schedule(tmp_path / "uninterrupted"))


def test_killed_between_checkpoints_with_one_trainer_per_task(tmp_path):
    # Killed at step 3 of the second task's Trainer (shuffled batches, expert dropout).
    out = killed_child(tmp_path, "--mode", "tasks", "--pause-at-step", 3)
    assert pmoe.last_complete_checkpoint(out / "task-0") == str(out / "task-0" / "checkpoint-4")
    checkpoint = pmoe.last_complete_checkpoint(out / "task-1")
    assert checkpoint == str(out / "task-1" / "checkpoint-2")

    model = PMoEForCausalLM.from_pretrained(checkpoint)
    assert model.config.expert_tasks == ["task-0", "task-1"] and model.config.expert_train_steps == [4, 2]
    resumed = run_tasks(out, model, tasks=["task-1"], resume=checkpoint)
    assert resumed.config.expert_train_steps == [4, 4]
    assert_same_model(resumed, run_tasks(tmp_path / "uninterrupted"))


@pytest.mark.parametrize("cut", ["weights", "trainer_state"])
def test_killed_while_writing_the_checkpoint_of_a_task_boundary(tmp_path, cut):
    # checkpoint-4 is the first one with task-1's new expert. "weights": killed half-way through its model.safetensors;
    # "trainer_state": killed after model, optimizer, scheduler and RNG state, before trainer_state.json (written last).
    pause = ["--pause-in-weights"] if cut == "weights" else ["--pause-before-trainer-state"]
    out = killed_child(tmp_path, "--mode", "schedule", *pause, "checkpoint-4", "--save-total-limit", 1)
    half_written = str(out / "checkpoint-4")
    # The Trainer deletes older checkpoints only after a save is complete, so checkpoint-2 is still there ...
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    assert not os.path.exists(os.path.join(half_written, "trainer_state.json"))
    # ... but transformers names the half-written folder as the last checkpoint, and resuming from it fails.
    assert get_last_checkpoint(out) == half_written
    if cut == "weights":
        with pytest.raises(Exception, match="incomplete metadata|deserializ"):
            PMoEForCausalLM.from_pretrained(half_written)
    else:
        loaded = PMoEForCausalLM.from_pretrained(half_written)  # the weights are whole; the checkpoint is not
        with pytest.raises(FileNotFoundError, match="trainer_state.json"):
            run_schedule(out, loaded, resume=True)
    assert not pmoe.is_complete_checkpoint(half_written)

    checkpoint = pmoe.last_complete_checkpoint(out)
    assert checkpoint == str(out / "checkpoint-2")
    resumed = run_schedule(out, PMoEForCausalLM.from_pretrained(checkpoint), resume=checkpoint, save_total_limit=1)
    assert_same_model(resumed, run_schedule(tmp_path / "uninterrupted"))
    assert sorted(os.listdir(out)) == ["checkpoint-8"]
    assert pmoe.last_complete_checkpoint(out) == str(out / "checkpoint-8")


@pytest.mark.parametrize("save", ["plain", "atomic"])
def test_killed_while_saving_the_model_at_a_task_boundary(tmp_path, save):
    # One Trainer per task, the model saved to out/model after each task; killed half-way through the weights of the
    # save after task-1 (which overwrites the save after task-0).
    folder = "model" if save == "plain" else ".model.saving"
    out = killed_child(tmp_path, "--mode", "tasks", "--save-after-task", save, "--pause-in-weights", folder)
    target = str(out / "model")
    after_first = {}
    uninterrupted = run_tasks(tmp_path / "uninterrupted",
                              after_task=lambda model, task: after_first or after_first.update(model.state_dict()))
    if save == "plain":
        # save_pretrained writes in place: the new config.json sits next to a truncated model.safetensors, and the
        # save of task-0 is gone.
        assert not pmoe.is_complete_save(target)
        with pytest.raises(Exception, match="incomplete metadata|deserializ"):
            PMoEForCausalLM.from_pretrained(target)
        return
    # save_pretrained_atomic: the folder still holds the complete save of task-0; the interrupted one is staged aside.
    assert pmoe.is_complete_save(target) and not pmoe.is_complete_save(out / ".model.saving")
    model = PMoEForCausalLM.from_pretrained(target)
    assert model.config.expert_tasks == ["task-0"] and model.config.expert_train_steps == [4]
    assert model.state_dict().keys() == after_first.keys()
    assert all(torch.equal(tensor, after_first[name]) for name, tensor in model.state_dict().items())
    # Train task-1 again from it (a fresh Trainer grows the same expert: it is seeded by TrainingArguments.seed).
    resumed = run_tasks(out, model, tasks=["task-1"])
    assert_same_model(resumed, uninterrupted)
    pmoe.save_pretrained_atomic(resumed, target)
    assert sorted(os.listdir(out)) == ["model", "task-0", "task-1"]  # the staged leftovers are cleaned up
    assert_same_model(PMoEForCausalLM.from_pretrained(target), uninterrupted)


def test_atomic_save_survives_a_crash_between_its_renames(tmp_path, monkeypatch):
    from processes.continual_child import MODEL
    from helpers import make_pmoe

    first, second = make_pmoe(**MODEL), make_pmoe(**MODEL)
    first.add_expert("a")
    second.add_expert("a")
    second.add_expert("b")
    target = tmp_path / "model"
    pmoe.save_pretrained_atomic(first, target)

    renames, rename = [], os.rename

    def rename_then_crash(source, destination):
        renames.append(destination)
        if len(renames) == 2:
            raise RuntimeError("crash between the two renames")
        rename(source, destination)

    monkeypatch.setattr(pmoe.checkpointing.os, "rename", rename_then_crash)
    with pytest.raises(RuntimeError, match="between the two renames"):
        pmoe.save_pretrained_atomic(second, target)
    monkeypatch.undo()
    # Nothing is lost: the old save is complete aside, the new one is complete in staging.
    assert not target.exists()
    assert pmoe.is_complete_save(tmp_path / ".model.previous") and pmoe.is_complete_save(tmp_path / ".model.saving")
    assert load_file(tmp_path / ".model.saving" / "model.safetensors").keys() == second.state_dict().keys()
    # The next atomic save to the folder puts the newest complete save back first, then replaces it.
    pmoe.save_pretrained_atomic(first, target)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert PMoEForCausalLM.from_pretrained(target).config.expert_tasks == ["a"]


def test_complete_save_checks_weights_against_the_config(tmp_path):
    import shutil

    from helpers import make_pmoe

    model = make_pmoe()
    model.add_expert("a")
    model.save_pretrained(tmp_path / "one")
    assert pmoe.is_complete_save(tmp_path / "one")
    model.add_expert("b")
    model.save_pretrained(tmp_path / "two")
    # A crash while overwriting a folder can leave the new config next to the old weights.
    shutil.copy(tmp_path / "two" / "config.json", tmp_path / "one" / "config.json")
    assert not pmoe.is_complete_save(tmp_path / "one")
    assert not pmoe.is_complete_checkpoint(tmp_path / "two")  # not a Trainer checkpoint
    assert pmoe.last_complete_checkpoint(tmp_path / "missing") is None


def test_warns_when_a_task_would_overwrite_another_tasks_checkpoints(tmp_path, caplog):
    from transformers import Trainer

    from processes.continual_child import MODEL, TASKS, training_args, task_dataset, without_task
    from helpers import make_pmoe

    model = make_pmoe(**MODEL)
    callback = pmoe.PMoEContinualCallback(tasks=TASKS)
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    with caplog.at_level("WARNING", logger="pmoe"):
        Trainer(model, args, train_dataset=without_task(task_dataset(0)), callbacks=[callback]).train()
        assert "overwrite" not in caplog.text
        Trainer(model, args, train_dataset=without_task(task_dataset(1)), callbacks=[callback])
    assert "checkpoint of experts ['task-0']" in caplog.text and "its own output_dir" in caplog.text
