"""Continual learning with the `Trainer` you already use: grow one expert per task, freeze the earlier ones.

Two ways to train, one callback:

* **One `Trainer` per task** (also under `torchrun` / DDP; with DeepSpeed ZeRO-3 or FSDP, save and reload the model
  between tasks so each expert is grown on an unsharded model):

  ```python
  callback = PMoEContinualCallback(tasks=["support", "sql"])
  for task, data in [("support", support_ds), ("sql", sql_ds)]:
      Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # grows the task's expert at init
  ```

  or call `callback.start_task(model, "sql")` yourself before building each Trainer. Either way the new expert exists
  before the Trainer builds its optimizer.

* **One `Trainer` run over several tasks** with `task_schedule=[("support", 500), ("sql", 300)]` (task name, optimizer
  steps), e.g. from a dataset whose `task` column is in training order (`schedule_from_task_column`) with
  `train_sampling_strategy="sequential"`. At each boundary the callback grows the next expert, freezes the previous
  one and adds the new parameters to the live optimizer's parameter groups, so the learning-rate scheduler drives them
  like every other parameter. Single process only: DDP / DeepSpeed / FSDP register parameters when they wrap the model.

Router keys (LDA, Gaussian) are fitted, not trained: with experts in every layer the callback fits each task's key in
one expert-free pass over a sample of its training examples before its first step (`fit_key_before_training`), so no
training step pays for that pass. Router health (per-expert load, gate entropy, and how often the router itself picks
the expert being trained) is added to the Trainer's logs, so it reaches TensorBoard and every other `report_to`
integration.

Resuming: load the model from the checkpoint (`PMoEForCausalLM.from_pretrained(checkpoint)`), build the Trainer with the
callback, and call `trainer.train(resume_from_checkpoint=checkpoint)`; in one-Trainer-per-task mode, call
`callback.start_task(model, <the interrupted task>)` first. The callback re-activates the interrupted task's expert and
checks the checkpoint against its tasks before any training step. Take the checkpoint from
`pmoe.last_complete_checkpoint(output_dir)`, not `resume_from_checkpoint=True`: after a crash during a save, the
Trainer's own choice is the half-written folder. With one Trainer per task, give each task its own `output_dir` (every
Trainer counts steps from 0), and save between tasks with `pmoe.save_pretrained_atomic` if you overwrite one folder.
"""

import bisect
import itertools
import json
import os
import sys

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_pt_utils import get_parameter_names
from transformers.utils import logging

from .checkpointing import _CHECKPOINT
from .experts_pmoe import KEY_STATISTICS
from .growth_pmoe import set_trainable
from .modeling_pmoe import PMoEPreTrainedModel


logger = logging.get_logger(__name__)

# Same rule as `Trainer.get_decay_parameter_names`: biases and norms get no weight decay.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def unwrap_pmoe(model) -> PMoEPreTrainedModel:
    """The PMoE model inside `model` (DDP / accelerate wrappers, PEFT), or a clear error."""
    seen = model
    for _ in range(4):
        # Duck-typed as well, so a model loaded as remote code (its own copy of the classes) is accepted too.
        if isinstance(seen, PMoEPreTrainedModel) or (
            getattr(getattr(seen, "config", None), "model_type", None) == "pmoe" and hasattr(seen, "add_expert")
        ):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "base_model", None)
        if seen is None:
            break
    raise TypeError(
        f"PMoEContinualCallback needs a PMoE model (PMoEForCausalLM or PMoEModel), got {type(model).__name__}. "
        "Convert a dense model first: PMoEForCausalLM.from_dense(model, num_shallow_layers=...)."
    )


def schedule_from_task_column(dataset, args, task_column: str = "task") -> list[tuple[str, int]]:
    """Turn a dataset whose `task_column` lists each example's task, in training order, into a `task_schedule`.

    Each task must be one contiguous block whose size is a whole number of optimizer steps
    (`per_device_train_batch_size * gradient_accumulation_steps` examples), so that no batch mixes two tasks. Train
    with `train_sampling_strategy="sequential"` and `max_steps` equal to the schedule's total.
    """
    if task_column not in dataset.column_names:
        raise ValueError(f"The dataset has no {task_column!r} column (columns: {dataset.column_names}).")
    tasks = list(dataset[task_column])
    examples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    schedule, seen = [], set()
    start = 0
    while start < len(tasks):
        task = tasks[start]
        if task in seen:
            raise ValueError(f"Task {task!r} appears in more than one block of the {task_column!r} column; "
                             "sort the dataset so that each task is one contiguous block, in training order.")
        end = start
        while end < len(tasks) and tasks[end] == task:
            end += 1
        size = end - start
        if size % examples_per_step:
            raise ValueError(
                f"Task {task!r} has {size} examples, not a multiple of the {examples_per_step} examples one optimizer "
                "step consumes (per_device_train_batch_size x gradient_accumulation_steps x processes); a batch would "
                "mix two tasks."
            )
        schedule.append((task, size // examples_per_step))
        seen.add(task)
        start = end
    return schedule

# Router buffers every process accumulates on its own batches (summed across processes under torchrun).
SYNCED_BUFFERS = {name for names in KEY_STATISTICS.values() for name in names} | {"usage"}


NEW_EXPERT_INITS = ("zero", "previous", "nearest")


def trainer_callbacks_calling(callback) -> list:
    """The Trainer's callback list, found from inside an event of `callback` (`CallbackHandler.call_event` ->
    `on_init_end` -> the caller of this function), so that `callback` can move itself. transformers has no supported
    way for a callback to change its place (`Trainer.add_callback` appends, and the reporting integrations come
    first), so this reads the handler from the call stack; it raises, naming the transformers version, if a release
    calls callbacks differently (a silent failure would drop the router metrics from TensorBoard & co.)."""
    frame = sys._getframe(2)  # 0: here, 1: the callback's method, 2: on_init_end, 3: CallbackHandler.call_event
    while frame is not None:
        handler = frame.f_locals.get("self")
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and any(item is callback for item in callbacks):
            return callbacks
        frame = frame.f_back
    raise RuntimeError(
        f"PMoEContinualCallback could not find the Trainer's callback list (transformers {transformers.__version__} "
        "calls callbacks differently from the releases pmoe is tested with), so the router metrics would miss the "
        "reporting integrations. Use a tested transformers release (see pmoe's README, 'Tested versions')."
    )


def schedule_new_param_group(scheduler, optimizer, group: dict, template: dict):
    """Register `group`, just added to `optimizer`, with the Trainer's `LambdaLR` `scheduler` so that it follows the
    schedule of `template` (the first group) from the current step. torch offers no API to add a parameter group to
    a scheduler, so this appends to `LambdaLR`'s `base_lrs` / `lr_lambdas` (the attributes its `get_lr` reads); any
    other scheduler is refused with a `ValueError`."""
    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(
            f"Cannot schedule the new expert's parameter group with a {type(scheduler).__name__}; use a "
            "LambdaLR-based scheduler (every `lr_scheduler_type` of TrainingArguments but "
            "reduce_lr_on_plateau) or one Trainer per task."
        )
    initial_lr = template.get("initial_lr", template["lr"])
    group["initial_lr"] = initial_lr
    scheduler.base_lrs.append(initial_lr)
    scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    group["lr"] = initial_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


class TaskSchedule:
    """One run that trains several tasks: `(task, optimizer steps)` in order (the callback's `task_schedule`)."""

    def __init__(self, entries):
        entries = [tuple(entry) for entry in entries]
        if not entries or any(
            len(entry) != 2 or not isinstance(entry[1], int) or isinstance(entry[1], bool) or entry[1] < 1
            for entry in entries
        ):
            raise ValueError(
                f"task_schedule must be a non-empty list of (task name, steps >= 1) pairs, got {entries!r}."
            )
        check_task_names([task for task, _ in entries], "task_schedule")
        self.entries = entries
        self.names = [task for task, _ in entries]
        self.total_steps = sum(steps for _, steps in entries)
        # global_step after which the next task starts -> its position in the schedule.
        ends = itertools.accumulate(steps for _, steps in entries[:-1])
        self.boundaries = {end: position + 1 for position, end in enumerate(ends)}

    def rows_of(self, position: int, args, size: int) -> range | None:
        """The dataset rows (of `size`) that task `position` trains on, where the run reads the dataset in order (one
        task, or `train_sampling_strategy="sequential"` as `schedule_from_task_column` asks); `None` otherwise."""
        if len(self.entries) == 1:
            return range(size)
        if args.train_sampling_strategy != "sequential":
            return None
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        start = sum(steps for _, steps in self.entries[:position]) * per_step
        return range(min(start, size), min(start + self.entries[position][1] * per_step, size))

    def position_of(self, step: int) -> int:
        """Index of the task that optimizer step `step` (0-based) belongs to."""
        return min(bisect.bisect_right(list(self.boundaries), step), len(self.entries) - 1)

    def check_run(self, args):
        """The run's `max_steps` must be the schedule's total, and experts cannot grow inside a distributed run."""
        if args.max_steps > 0 and args.max_steps != self.total_steps:
            raise ValueError(
                f"task_schedule adds up to {self.total_steps} steps but the run is max_steps={args.max_steps}: set "
                f"max_steps={self.total_steps} or change the schedule."
            )
        if args.max_steps <= 0:
            raise ValueError(
                f"With a task_schedule set max_steps={self.total_steps} (the schedule's total) in TrainingArguments."
            )
        distributed = max(1, getattr(args, "world_size", 1)) > 1
        if len(self.entries) > 1 and (distributed or args.deepspeed or args.fsdp):
            raise ValueError(
                "Growing experts inside one distributed (DDP / DeepSpeed / FSDP) run is not supported: the wrapper "
                "registers the parameters it synchronises when it wraps the model. Train one task per Trainer "
                "(PMoEContinualCallback(tasks=[...])), saving and reloading the model between tasks under "
                "DeepSpeed ZeRO-3 or FSDP."
            )


def check_task_names(names, field):
    """Task names are non-empty strings, each named once."""
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{field} contains an invalid task name {name!r}: use non-empty strings.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{field} names the same task more than once: {duplicates}.")


def add_expert_to_optimizer(pmoe_model, index, optimizer, lr_scheduler):
    """Put expert `index`'s parameters into the live optimizer: into the Trainer's existing decay / no-decay
    groups when they exist (the scheduler already drives those), else as new groups registered with the
    LambdaLR scheduler."""
    if optimizer is None:
        raise ValueError("No optimizer to add the new expert to: the Trainer has not built one.")
    names = pmoe_model.expert_parameters(index)
    decay_names = set(get_parameter_names(pmoe_model, [nn.LayerNorm], NO_DECAY_PATTERNS))
    new = {"decay": [p for n, p in names.items() if n in decay_names],
           "no_decay": [p for n, p in names.items() if n not in decay_names]}
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = inner.param_groups
    # The Trainer builds two groups: [decay, no decay (weight_decay=0)].
    trainer_layout = len(groups) == 2 and groups[1].get("weight_decay", 0.0) == 0.0
    order = {param: position for position, param in enumerate(pmoe_model.parameters())}
    for kind, params in new.items():
        if not params:
            continue
        if trainer_layout:
            group = groups[0 if kind == "decay" else 1]
            # Keep each group in the model's parameter order, as a resumed Trainer builds it, so that saved
            # optimizer state lines up with the right tensors on resume.
            group["params"] = sorted([*group["params"], *params], key=lambda p: order.get(p, len(order)))
            continue
        template = groups[0]
        group = {key: value for key, value in template.items() if key != "params"}
        group["params"] = params
        if kind == "no_decay":
            group["weight_decay"] = 0.0
        inner.add_param_group(group)
        schedule_new_param_group(getattr(lr_scheduler, "scheduler", lr_scheduler), inner, group, template)


def collated_batch(pmoe_model, train_dataloader, indices) -> dict[str, torch.Tensor]:
    """The training dataset's examples `indices`, collated as the Trainer's dataloader collates them, on the model's
    device (a map-style dataset: the dataloader's sampler, and its random state, are not touched)."""
    dataset = train_dataloader.dataset
    device = pmoe_model.get_input_embeddings().weight.device
    return {key: value.to(device) for key, value in train_dataloader.collate_fn([dataset[i] for i in indices]).items()
            if isinstance(value, torch.Tensor)}


def start_from_nearest_expert(pmoe_model, index, train_dataloader, args):
    """Copy into the new expert `index` the earlier expert that fits the task's first examples best (if any)."""
    pmoe_model.check_expert_start("new_expert_init='nearest'")
    if index == 0 or train_dataloader is None:
        return None
    first = range(min(len(train_dataloader.dataset), args.per_device_train_batch_size))
    nearest = pmoe_model.nearest_expert(collated_batch(pmoe_model, train_dataloader, first), candidates=range(index))
    if nearest is not None:
        pmoe_model.copy_expert_weights(nearest, index)
        task = pmoe_model.config.expert_tasks[index]
        logger.info(f"Task {task!r}: expert {index} starts from expert {nearest} "
                    f"({pmoe_model.config.expert_tasks[nearest]!r}), which fits its first examples best.")
    return nearest


def fit_key_before_training(pmoe_model, index, train_dataloader, args, rows: range | None = None) -> int | None:
    """Fit expert `index`'s router key in one expert-free pass (`fit_router_key`) over a random sample of
    `router_fit_sequences` of the task's training examples (`rows` of the dataset, default all of it; under
    torchrun each process takes its share), before the task's first step, so that no training step runs the
    expert-free pass. Returns the sequences fitted, or `None` where the training steps fit the key instead: a key
    that already holds statistics (resuming: it is kept as the checkpoint has it, and closed), a layout whose training
    forward reads the features at no extra cost (`expert_layers="deep"`), token routing, learned keys, per-layer
    routers, an iterable dataset, DeepSpeed / FSDP (the pass calls the model's layers directly, which would see their
    sharded parameters) or a model loaded as remote code from a release without `fit_router_key`."""
    config = pmoe_model.config
    if args.deepspeed or args.fsdp or not hasattr(pmoe_model, "fit_router_key"):
        return None
    if config.expert_layers != "all" or config.routing != "sequence" or not config.router_keys_are_fitted:
        return None
    if config.router_per_layer:
        return None
    key = pmoe_model.expert_routers()[0].experts[index]
    if key.count > 0:
        key.closed = True
        return None
    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    rows = range(len(dataset)) if rows is None else rows
    generator = torch.Generator().manual_seed(args.seed if args.data_seed is None else args.data_seed)
    sample = [rows[i] for i in torch.randperm(len(rows), generator=generator)[: config.router_fit_sequences].tolist()]
    if not sample:
        return None
    share = sample[args.process_index :: max(1, args.world_size)]  # the callback then sums the processes' statistics
    size = args.per_device_eval_batch_size
    batches = (collated_batch(pmoe_model, train_dataloader, share[start : start + size])
               for start in range(0, len(share), size))
    fitted = pmoe_model.fit_router_key(batches, expert=index)
    key.closed = True  # on every process, also one whose share was empty
    logger.info(f"Task {config.expert_tasks[index]!r}: fitted the router key of expert {index} on {len(sample)} "
                "training sequences in one expert-free pass before its first step; the training steps skip that pass.")
    return fitted


def warn_about_other_tasks_checkpoints(args, pmoe_model):
    """Each Trainer counts steps from 0, so in an output_dir shared by several tasks this task's checkpoint-N
    overwrites an earlier task's, in place (a crash mid-save loses both), and the highest-numbered checkpoint
    need not be the newest."""
    if args.save_strategy == "no" or not args.should_save or not os.path.isdir(args.output_dir):
        return
    for name in sorted(os.listdir(args.output_dir)):
        try:
            with open(os.path.join(args.output_dir, name, "config.json"), encoding="utf-8") as handle:
                tasks = json.load(handle).get("expert_tasks") if _CHECKPOINT.match(name) else None
        except (OSError, ValueError, AttributeError):
            continue
        if tasks is not None and tasks != pmoe_model.config.expert_tasks:
            logger.warning(
                f"{os.path.join(args.output_dir, name)} is a checkpoint of experts {tasks}, but this Trainer "
                f"trains {pmoe_model.config.expert_tasks}: its checkpoints will overwrite those of the same step. "
                "Give each task its own output_dir."
            )
            return


def router_statistics(pmoe_model) -> dict[str, torch.Tensor]:
    """A copy of the statistics every process updates on its own batches (fitted keys, expert usage)."""
    return {name: buffer.detach().clone() for name, buffer in pmoe_model.named_buffers()
            if name.rsplit(".", 1)[-1] in SYNCED_BUFFERS}


def sync_router_statistics(pmoe_model, snapshot: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Under torchrun every process fits the trained expert's key (and counts expert usage) on its own batches: add
    the other processes' contributions since `snapshot` (`router_statistics` at the last sync), so every process (and
    the checkpoint) has the global statistics. Returns the snapshot to pass next time."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return snapshot
    if torch.distributed.get_world_size() < 2:
        return snapshot
    snapshot = snapshot or {}
    for name, buffer in pmoe_model.named_buffers():
        if name not in snapshot or snapshot[name].shape != buffer.shape:
            continue
        delta = buffer - snapshot[name].to(buffer.device)
        torch.distributed.all_reduce(delta)
        buffer.copy_(snapshot[name].to(buffer.device) + delta)
    return router_statistics(pmoe_model)


class PMoEContinualCallback(TrainerCallback):
    """Grows one expert per task at task boundaries, freezes the earlier ones, logs router health.

    Args:
        tasks (`list[str]`, *optional*): one-Trainer-per-task mode: each Trainer built with this callback starts the
            next of these tasks that the model has no expert for (unless `start_task` was called for it).
        task_schedule (`list[tuple[str, int]]`, *optional*): one-run mode: `(task, optimizer steps)` in order; the
            steps must add up to the run's `max_steps`.
        log_router (`bool`, defaults to `True`): add router load / entropy / agreement to the logs.
        distillation_alpha (`float`, *optional*): set `config.distillation_alpha` of the model (Lifelong-MoE
            `alpha * KL(old || new)`, see `PMoEConfig`) when the Trainer is built.
        merge_every_n_steps (`int`, *optional*): every N optimizer steps, merge the two most used experts over the
            least used other one (`model.merge_experts`, Park 2024), among the experts not being trained; skipped while
            there are fewer than 3 of those.
        merge_method (`"svd"` or `"average"`, defaults to `"svd"`).
        evaluate_fn (`Callable[[model, list[str]], dict[str, float]]`, *optional*): called at the end of every task
            with the model and its task names so far; the scores it returns become one row of the model's
            continual-learning record (`model.record_task_scores`, saved in the config, shown in the model card).
        metric_name (`str`, defaults to `"accuracy"`): what `evaluate_fn` measures (the record's label).
        max_experts (`int`, *optional*): cap the expert count. Before a new task's expert is grown on a model that
            already has `max_experts`, the two most used experts are merged into one and the other is removed
            (`model.cap_experts`), so long task sequences keep a bounded model. One-Trainer-per-task mode only.
        new_expert_init (`"zero"`, `"previous"` or `"nearest"`, defaults to `"zero"`): how a new task's expert
            starts: PEFT's LoRA init (B = 0); a copy of the newest earlier expert; or a copy of the earlier expert
            under which the task's first training examples have the lowest loss, if one beats the model without
            experts (`model.nearest_expert`; checked when training starts; one Trainer per task, fitted keys). Either way
            the model's outputs on earlier tasks do not change at growth (the new key starts unfitted). The picks
            are kept in `callback.started_from` (task -> source expert, `None` for PEFT's init).
        fit_keys_before_training (`bool`, defaults to `True`): fit each task's router key in one expert-free pass over a
            sample of `router_fit_sequences` of its examples before its first step (`fit_key_before_training`), so no
            training step runs that pass. `False`: the training steps fit it on their first `router_fit_sequences`
            sequences (each step then runs the shallow layers twice), e.g. for a dataset that is slow to index.
    """

    def __init__(self, tasks: list[str] | None = None, task_schedule: list[tuple[str, int]] | None = None,
                 log_router: bool = True, distillation_alpha: float | None = None,
                 merge_every_n_steps: int | None = None, merge_method: str = "svd", evaluate_fn=None,
                 metric_name: str = "accuracy", max_experts: int | None = None, new_expert_init: str = "zero",
                 fit_keys_before_training: bool = True):
        if tasks is not None and task_schedule is not None:
            raise ValueError("Pass either `tasks` (one Trainer per task) or `task_schedule` (one run), not both.")
        if tasks is not None:
            tasks = list(tasks)
            check_task_names(tasks, "tasks")
        self._schedule = TaskSchedule(task_schedule) if task_schedule is not None else None
        if distillation_alpha is not None and (
            isinstance(distillation_alpha, bool) or not isinstance(distillation_alpha, (int, float))
            or not 0 <= distillation_alpha < float("inf")
        ):
            raise ValueError(f"distillation_alpha must be a finite number >= 0, got {distillation_alpha!r}.")
        if merge_every_n_steps is not None and (
            isinstance(merge_every_n_steps, bool) or not isinstance(merge_every_n_steps, int) or merge_every_n_steps < 1
        ):
            raise ValueError(f"merge_every_n_steps must be None or an integer >= 1, got {merge_every_n_steps!r}.")
        if merge_method not in ("svd", "average"):
            raise ValueError(f"merge_method must be 'svd' or 'average', got {merge_method!r}.")
        if evaluate_fn is not None and not callable(evaluate_fn):
            raise ValueError(f"evaluate_fn must be callable (model, task_names) -> {{task: score}}, got {evaluate_fn!r}.")
        if max_experts is not None and (
            isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < 2
        ):
            raise ValueError(f"max_experts must be None or an integer >= 2 (two merge into one), got {max_experts!r}.")
        if max_experts is not None and task_schedule is not None:
            raise ValueError(
                "max_experts removes merged experts, which a live optimizer still holds: use it with `tasks=` (one "
                "Trainer per task), not with task_schedule."
            )
        if new_expert_init not in NEW_EXPERT_INITS:
            raise ValueError(f"new_expert_init must be one of {NEW_EXPERT_INITS}, got {new_expert_init!r}.")
        if new_expert_init == "nearest" and task_schedule is not None:
            raise ValueError(
                "new_expert_init='nearest' looks at the new task's first training batch when its Trainer starts: use "
                "it with `tasks=` (one Trainer per task), not with task_schedule."
            )
        self.new_expert_init = new_expert_init
        self.fit_keys_before_training = bool(fit_keys_before_training)
        self._fresh_expert = None  # grown by start_task and not trained yet: "nearest" may still initialise it
        self.started_from = {}  # "nearest": task -> the expert its expert was copied from (None: PEFT's init)
        self.max_experts = max_experts
        self.evaluate_fn = evaluate_fn
        self.metric_name = metric_name
        self.tasks = tasks
        self.distillation_alpha = distillation_alpha
        self.merge_every_n_steps = merge_every_n_steps
        self.merge_method = merge_method
        self.log_router = log_router
        self.current_task: str | None = None
        self._explicitly_started: str | None = None
        self._stats_snapshot: dict[str, torch.Tensor] | None = None

    @property
    def task_schedule(self) -> list[tuple[str, int]] | None:
        """The `(task, optimizer steps)` pairs of one-run mode (`None` with one Trainer per task)."""
        return None if self._schedule is None else self._schedule.entries

    # ------------------------------------------------------------------------------------------- task control
    def start_task(self, model, task_name: str) -> int:
        """Make `task_name` the task being trained: grow its expert (freezing every other expert and the base weights)
        or, if the model's newest expert already belongs to it (resuming), re-activate that expert. Returns its index.
        Call it before building the task's Trainer."""
        pmoe_model = unwrap_pmoe(model)
        config = pmoe_model.config
        if task_name in config.expert_tasks:
            index = config.expert_tasks.index(task_name)
            if index != config.num_experts - 1:
                raise ValueError(
                    f"Task {task_name!r} already has expert {index}, and later experts exist ({config.expert_tasks}): "
                    "a finished task cannot be trained again without changing the tasks after it. Use a new task name."
                )
            self._activate(pmoe_model, index)
            logger.info(f"Resuming task {task_name!r} on its expert {index}.")
        else:
            if self.max_experts is not None and config.num_experts >= self.max_experts:
                pmoe_model.training_expert = None  # the previous task is finished: its expert may be merged too
                for first, second in pmoe_model.cap_experts(self.max_experts - 1, method=self.merge_method):
                    logger.info(f"Merged the experts of {first!r} and {second!r} to stay within {self.max_experts}.")
            previous = config.num_experts - 1 if self.new_expert_init == "previous" and config.num_experts else None
            index = pmoe_model.add_expert(task_name, init_from=previous)
            self._fresh_expert = index
            logger.info(f"Started task {task_name!r}: expert {index}.")
        self.current_task = task_name
        self._explicitly_started = task_name
        self._stats_snapshot = router_statistics(pmoe_model)
        return index

    @staticmethod
    def _activate(pmoe_model, index, trainable_experts=None):
        """Only expert `index` (or `trainable_experts`), the model's task heads and, if configured, the base weights
        require grad: what `add_expert` leaves trainable, so a resumed task trains the same parameters."""
        set_trainable(pmoe_model, {index} if trainable_experts is None else trainable_experts)
        pmoe_model.training_expert = index

    # ------------------------------------------------------------------------------------------- Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        pmoe_model = unwrap_pmoe(model)
        self._run_before_reporting_callbacks()
        if self.distillation_alpha is not None:
            pmoe_model.config.distillation_alpha = float(self.distillation_alpha)
            pmoe_model.config.validate_pmoe()
        if self._schedule is not None:
            self._init_schedule(args, pmoe_model)
        elif self._explicitly_started is not None and self._explicitly_started in pmoe_model.config.expert_tasks:
            pass  # start_task was called for this Trainer
        elif self.tasks is not None:
            # A merged expert is named "<task>+<task>": its tasks are trained too.
            trained = {part for name in pmoe_model.config.expert_tasks for part in (name, *name.split("+"))}
            pending = [task for task in self.tasks if task not in trained]
            if not pending:
                raise ValueError(
                    f"Every task in {self.tasks} already has an expert; nothing to train. To resume an interrupted "
                    "task, call callback.start_task(model, task) before building the Trainer."
                )
            self.start_task(pmoe_model, pending[0])
        elif pmoe_model.config.num_experts == 0:
            raise ValueError(
                "The model has no expert to train: pass `tasks=[...]` or `task_schedule=[...]` to "
                "PMoEContinualCallback, or call callback.start_task(model, task) before building the Trainer."
            )
        else:
            # No task information: keep training the newest expert.
            self.start_task(pmoe_model, pmoe_model.config.expert_tasks[-1])
        self._explicitly_started = None
        if self._schedule is None:
            warn_about_other_tasks_checkpoints(args, pmoe_model)

    def _init_schedule(self, args, pmoe_model):
        self._schedule.check_run(args)
        names = self._schedule.names
        existing = pmoe_model.config.expert_tasks
        started = [task for task in existing if task in names]
        if started != names[: len(started)] or existing[len(existing) - len(started):] != started:
            raise ValueError(
                f"The model's experts {existing} do not match task_schedule {names}: a checkpoint of this run has the "
                "schedule's first tasks as its newest experts, in order. Resume with the model saved in the "
                "checkpoint you resume from."
            )
        if not started:
            self.start_task(pmoe_model, names[0])
        else:
            # Resuming: the run's optimizer held every expert it had grown so far; rebuild it the same way, then
            # freeze the finished ones in on_train_begin, after the optimizer state is loaded.
            first = len(existing) - len(started)
            self._activate(pmoe_model, len(existing) - 1, trainable_experts=range(first, len(existing)))
            self.current_task = started[-1]
            self._stats_snapshot = router_statistics(pmoe_model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        pmoe_model = unwrap_pmoe(model)
        if self._schedule is None:
            fresh, self._fresh_expert = self._fresh_expert, None
            if self.new_expert_init == "nearest" and fresh is not None and state.global_step == 0:
                source = start_from_nearest_expert(pmoe_model, fresh, train_dataloader, args)
                self.started_from[pmoe_model.config.expert_tasks[fresh]] = source
            if pmoe_model.training_expert is not None:
                self._fit_key(pmoe_model, pmoe_model.training_expert, train_dataloader, args)
            return
        position = self._schedule.position_of(state.global_step)
        expected = self._schedule.names[position]
        if self.current_task != expected:
            raise ValueError(
                f"Step {state.global_step} of task_schedule belongs to task {expected!r}, but the model's newest "
                f"expert is for {self.current_task!r} (experts {pmoe_model.config.expert_tasks}). Resume with the "
                "model saved in the checkpoint you resume from."
            )
        self._activate(pmoe_model, pmoe_model.config.expert_tasks.index(expected))
        self._fit_scheduled_key(pmoe_model, position, train_dataloader, args)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        pmoe_model = unwrap_pmoe(model)
        if pmoe_model.training_expert is not None:
            steps = list(pmoe_model.config.expert_train_steps)
            steps[pmoe_model.training_expert] += 1
            pmoe_model.config.expert_train_steps = steps
        if self.merge_every_n_steps and state.global_step % self.merge_every_n_steps == 0:
            others = pmoe_model.config.num_experts - (pmoe_model.training_expert is not None)
            if others >= 3:
                self._sync_statistics(pmoe_model)  # every process picks the same experts
                first, second, target = pmoe_model.merge_experts(method=self.merge_method)
                logger.info(f"Step {state.global_step}: merged experts {first} and {second} into expert {target}.")
                self._stats_snapshot = router_statistics(pmoe_model)
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            self._sync_statistics(pmoe_model)
        if self._schedule is None:
            return
        next_position = self._schedule.boundaries.get(state.global_step)
        if next_position is None:
            return
        self._sync_statistics(pmoe_model)
        self._record_scores(pmoe_model)
        task = self._schedule.names[next_position]
        index = self.start_task(pmoe_model, task)
        add_expert_to_optimizer(pmoe_model, index, optimizer, kwargs.get("lr_scheduler"))
        self._fit_scheduled_key(pmoe_model, next_position, kwargs.get("train_dataloader"), args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._record_scores(unwrap_pmoe(model))

    def _record_scores(self, pmoe_model):
        """One row of the continual-learning record: `evaluate_fn`'s scores on every task so far."""
        if self.evaluate_fn is None:
            return
        was_training = pmoe_model.training
        scores = self.evaluate_fn(pmoe_model, list(pmoe_model.config.expert_tasks))
        pmoe_model.train(was_training)
        pmoe_model.record_task_scores(scores, self.metric_name)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_router or logs is None or model is None:
            return
        pmoe_model = unwrap_pmoe(model)
        for position, router in enumerate(pmoe_model.expert_routers()):
            stats = router.pop_log_stats()
            if stats is None:
                continue
            prefix = "router" if len(pmoe_model.expert_routers()) == 1 else f"router{position}"
            for index, load in enumerate(stats["load"]):
                logs[f"{prefix}/load/{index}_{pmoe_model.config.expert_tasks[index]}"] = round(load, 6)
            logs[f"{prefix}/entropy"] = round(stats["entropy"], 6)
            if "agreement" in stats:
                logs[f"{prefix}/agreement"] = round(stats["agreement"], 6)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k.startswith("router")})

    # ------------------------------------------------------------------------------------------- helpers
    def _fit_key(self, pmoe_model, index, train_dataloader, args, rows=None):
        """The task's router key, fitted before its first step (`fit_key_before_training`), alike on every process."""
        if not self.fit_keys_before_training:
            return
        if fit_key_before_training(pmoe_model, index, train_dataloader, args, rows) is not None:
            self._sync_statistics(pmoe_model)

    def _fit_scheduled_key(self, pmoe_model, position, train_dataloader, args):
        dataset = getattr(train_dataloader, "dataset", None)
        rows = self._schedule.rows_of(position, args, len(dataset)) if hasattr(dataset, "__len__") else None
        if rows is not None:
            self._fit_key(pmoe_model, pmoe_model.config.expert_tasks.index(self._schedule.names[position]),
                          train_dataloader, args, rows)

    def _sync_statistics(self, pmoe_model):
        self._stats_snapshot = sync_router_statistics(pmoe_model, self._stats_snapshot)

    def _run_before_reporting_callbacks(self):
        """Move this callback right after `DefaultFlowCallback`, so the router metrics it adds to `logs` in `on_log`
        are there when TensorBoard & co. (registered before user callbacks) write them."""
        callbacks = trainer_callbacks_calling(self)
        callbacks.remove(self)
        callbacks.insert(min(1, len(callbacks)), self)



__all__ = [
    "PMoEContinualCallback", "TaskSchedule", "add_expert_to_optimizer", "schedule_from_task_column", "unwrap_pmoe",
]
