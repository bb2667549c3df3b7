"""Short continual-training runs shared by the interruption and determinism tests, runnable in a child process.

`python tests/processes/continual_child.py OUTPUT_DIR --mode schedule|tasks [--pause-at-step N | --pause-in-save ...]`: with a
pause point, the child writes `--marker` and sleeps there, so the parent can SIGKILL it at a known moment.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

import torch  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import pmoe  # noqa: E402
from pmoe import PMoEContinualCallback  # noqa: E402

from helpers import make_pmoe, task_dataset, training_args, without_task  # noqa: E402


SCHEDULE = [("task-0", 4), ("task-1", 4)]
TASKS = ["task-0", "task-1"]
# Dropout in the experts, so the runs also depend on the RNG state that resuming must restore.
MODEL = dict(expert_dropout=0.1)


def schedule_args(output_dir, **overrides):
    fields = dict(max_steps=8, train_sampling_strategy="sequential", save_strategy="steps", save_steps=2)
    fields.update(overrides)
    return training_args(output_dir, **fields)


def run_schedule(output_dir, model=None, resume=None, callbacks=(), **overrides):
    """Both tasks in one Trainer run (`task_schedule`), checkpoints every 2 steps (the boundary is step 4)."""
    model = make_pmoe(**MODEL) if model is None else model
    data = without_task(concatenate_datasets([task_dataset(0), task_dataset(1)]))
    trainer = Trainer(model, schedule_args(output_dir, **overrides), train_dataset=data,
                      callbacks=[PMoEContinualCallback(task_schedule=SCHEDULE), *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return model


def task_args(output_dir, task, **overrides):
    # One output folder per task: each Trainer counts steps from 0, so a shared folder would see task 1's
    # checkpoint-2 overwrite task 0's.
    fields = dict(save_strategy="steps", save_steps=2)
    fields.update(overrides)
    return training_args(os.path.join(output_dir, task), **fields)


def run_tasks(output_dir, model=None, tasks=TASKS, save=None, callbacks=(), resume=None, after_task=None, **overrides):
    """One Trainer per task (shuffled batches: `data_seed` matters), 4 steps each. `save(model, task)` runs after
    each task (the boundary); `resume` resumes the first task in `tasks` from that checkpoint."""
    model = make_pmoe(**MODEL) if model is None else model
    callback = PMoEContinualCallback(tasks=TASKS)
    for task in tasks:
        if resume is not None:
            callback.start_task(model, task)
        trainer = Trainer(model, task_args(output_dir, task, **overrides),
                          train_dataset=without_task(task_dataset(TASKS.index(task))),
                          callbacks=[callback, *callbacks])
        trainer.train(resume_from_checkpoint=resume)
        resume = None
        if after_task is not None:
            after_task(model, task)
        if save is not None:
            save(model, task)
    return model


# ------------------------------------------------------------------------------------------- for the parent
HERE = os.path.abspath(__file__)


def start_child(output_dir, *arguments, log):
    """Start this script on `output_dir` in a fresh interpreter (one torch thread, as the tests use: the runs are
    bit-identical only at the same thread count, and 1 thread is also far faster on a busy 2-core machine)."""
    import subprocess

    handle = open(log, "w")
    return subprocess.Popen([sys.executable, HERE, str(output_dir), "--threads", "1", *map(str, arguments)],
                            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_at_marker(process, marker, log, timeout=120):
    """Wait until the child writes `marker` (it is then paused at the point under test), then SIGKILL it."""
    import signal

    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            with open(log) as handle:
                raise AssertionError(f"the child never reached its pause point:\n{handle.read()[-4000:]}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def finish(process, log, timeout=120):
    if process.wait(timeout=timeout) != 0:
        with open(log) as handle:
            raise AssertionError(f"the child failed:\n{handle.read()[-4000:]}")


def pause(marker):
    with open(marker, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)
    raise SystemExit("the parent did not kill this process")


class PauseAtStep(TrainerCallback):
    """Between checkpoints: write the marker after optimizer step `step` and wait to be killed."""

    def __init__(self, step, marker, task=None):
        self.step, self.marker, self.task = step, marker, task

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.task is not None and model.config.expert_tasks[-1] != self.task:
            return
        if state.global_step == self.step and not control.should_save:
            pause(self.marker)


def pause_in_weights(folder_name, marker, only_with_expert=None):
    """Make the model save into a folder named `folder_name` (and holding expert `only_with_expert`, if given) write
    half of model.safetensors, then pause (a slow disk, killed mid-write)."""
    import safetensors.torch
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file

    def slow_save(tensors, filename, metadata=None):
        if os.path.basename(os.path.dirname(filename)) != folder_name or (
            only_with_expert is not None and not any(f".experts.{only_with_expert}." in name for name in tensors)
        ):
            return original(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
        pause(marker)

    modeling_utils.safe_save_file = slow_save


def pause_before_trainer_state(folder_name, marker):
    """Let the Trainer write the model, optimizer, scheduler and RNG state of `folder_name`, then pause before
    trainer_state.json (the last file of a checkpoint)."""
    from transformers.trainer_callback import TrainerState

    original = TrainerState.save_to_json

    def slow_save(self, json_path):
        if os.path.basename(os.path.dirname(json_path)) == folder_name:
            pause(marker)
        return original(self, json_path)

    TrainerState.save_to_json = slow_save


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--mode", choices=["schedule", "tasks"], required=True)
    parser.add_argument("--marker")
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--pause-in-weights", help="folder name whose model.safetensors write is cut in half")
    parser.add_argument("--pause-before-trainer-state", help="checkpoint folder name")
    parser.add_argument("--save-after-task", choices=["plain", "atomic"],
                        help="tasks mode: save the model to OUTPUT_DIR/model after every task")
    parser.add_argument("--final", help="save the final model here")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--save-total-limit", type=int)
    parser.add_argument("--seed", type=int, help="TrainingArguments seed and data_seed")
    parser.add_argument("--no-checkpoints", action="store_true")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.pause_in_weights:
        # In tasks mode, pause in the save at the end of the last task (the one whose weights hold its expert).
        only_with_expert = len(TASKS) - 1 if options.mode == "tasks" else None
        pause_in_weights(options.pause_in_weights, options.marker, only_with_expert)
    if options.pause_before_trainer_state:
        pause_before_trainer_state(options.pause_before_trainer_state, options.marker)
    # In tasks mode, only the last task's Trainer pauses between checkpoints.
    pause_task = TASKS[-1] if options.mode == "tasks" else None
    callbacks = [PauseAtStep(options.pause_at_step, options.marker, pause_task)] if options.pause_at_step else []
    overrides = {"save_total_limit": options.save_total_limit} if options.save_total_limit else {}
    if options.no_checkpoints:
        overrides["save_strategy"] = "no"
    if options.seed is not None:
        overrides.update(seed=options.seed, data_seed=options.seed)
    if options.mode == "schedule":
        model = run_schedule(options.output_dir, callbacks=callbacks, **overrides)
    else:
        save = None
        if options.save_after_task:
            target = os.path.join(options.output_dir, "model")
            save = ((lambda model, task: model.save_pretrained(target)) if options.save_after_task == "plain"
                    else (lambda model, task: pmoe.save_pretrained_atomic(model, target)))
        model = run_tasks(options.output_dir, save=save, callbacks=callbacks, **overrides)
    if options.final:
        model.save_pretrained(options.final)


if __name__ == "__main__":
    main()
