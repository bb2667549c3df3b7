"""Continual learning with the real `Trainer`: growth at task boundaries, bit-identical freezing, logs, resume."""

import glob
import os

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from transformers import Trainer, TrainerCallback

from pmoe import PMoEContinualCallback, PMoEForCausalLM, PMoEForSequenceClassification, schedule_from_task_column
from pmoe.trainer_callbacks import add_expert_to_optimizer

from helpers import make_dense, make_pmoe, task_dataset, tiny_pmoe_config, training_args, without_task


def snapshot(tensors):
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def assert_identical(tensors, saved):
    assert tensors.keys() == saved.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, saved[name]), name


def test_one_trainer_per_task_freezes_everything_but_the_new_expert(tmp_path):
    model = make_pmoe()
    base = snapshot(model.base_parameters())
    callback = PMoEContinualCallback(tasks=["task-0", "task-1"])

    trainer = Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(0)), callbacks=[callback])
    assert model.config.expert_tasks == ["task-0"]  # grown at init, before the optimizer exists
    trainer.train()
    first = snapshot(model.expert_tensors(0))
    assert model.model.routers[0].experts[0].count == 16  # its Gaussian key was fitted on the task's prompts

    trainer = Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(1)), callbacks=[callback])
    assert model.config.expert_tasks == ["task-0", "task-1"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(model.expert_parameters(1))
    trainer.train()

    assert_identical(model.expert_tensors(0), first)
    assert_identical(model.base_parameters(), base)
    assert any(torch.count_nonzero(p) for n, p in model.expert_parameters(1).items() if n.endswith("lora_B"))
    assert model.config.expert_train_steps == [4, 4]
    assert "router/entropy" in trainer.state.log_history[0]


def test_start_task_before_each_trainer(tmp_path):
    model = make_pmoe()
    callback = PMoEContinualCallback()
    for task in range(2):
        callback.start_task(model, f"task-{task}")
        Trainer(model, training_args(tmp_path, max_steps=2), train_dataset=without_task(task_dataset(task)),
                callbacks=[callback]).train()
    assert model.config.expert_tasks == ["task-0", "task-1"]
    assert model.config.expert_train_steps == [2, 2]


class TrainingForwardsOfLayerZero(TrainerCallback):
    """Counts layer 0's training-mode forwards (two per step while the expert-free pass runs, one without it) and
    records the trained expert's key when the first step begins."""

    def __init__(self, model):
        self.model, self.calls, self.key_at_first_step = model, [], None
        layer = model.model.layers[0]
        layer.register_forward_hook(lambda module, *_: self.calls.append(1) if module.training else None)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.key_at_first_step is None:
            key = self.model.model.routers[0].experts[self.model.training_expert]
            self.key_at_first_step = (key.count.item(), key.closed)


def test_the_callback_fits_a_tasks_key_before_its_first_step_so_no_step_runs_the_expert_free_pass(tmp_path):
    model = make_pmoe(router_fit_sequences=10)  # a random sample of 10 of the task's 16 examples
    callback = PMoEContinualCallback(tasks=["task-0"])
    probe = TrainingForwardsOfLayerZero(model)
    trainer = Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
                      callbacks=[callback, probe])
    trainer.train()
    assert probe.key_at_first_step == (10, True)
    assert len(probe.calls) == 4  # one forward of layer 0 per step: no expert-free pass
    assert "router/agreement" in trainer.state.log_history[0]  # the fitting pass's routing decisions are logged
    fitted = {name: tensor.clone() for name, tensor in model.expert_tensors(0).items() if ".routers." in name}

    # The same seed samples the same examples: another run fits the same key, bit for bit.
    again = make_pmoe(router_fit_sequences=10)
    Trainer(again, training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
            callbacks=[PMoEContinualCallback(tasks=["task-0"])]).train()
    assert_identical({n: t for n, t in again.expert_tensors(0).items() if ".routers." in n}, fitted)

    # Resuming the task (its key already holds statistics, as a checkpoint's does): kept as it is, not refitted.
    callback.start_task(model, "task-0")
    probe.calls.clear()
    Trainer(model, training_args(tmp_path, max_steps=2), train_dataset=without_task(task_dataset(0)),
            callbacks=[callback]).train()
    assert_identical({n: t for n, t in model.expert_tensors(0).items() if ".routers." in n}, fitted)
    assert len(probe.calls) == 2


def test_the_fitting_pass_can_be_turned_off(tmp_path):
    model = make_pmoe(router_fit_sequences=10)
    probe = TrainingForwardsOfLayerZero(model)
    Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
            callbacks=[PMoEContinualCallback(tasks=["task-0"], fit_keys_before_training=False), probe]).train()
    assert probe.key_at_first_step == (0, False)
    assert len(probe.calls) == 4 + 3  # the pass ran in the steps until the key had seen 10 sequences (3 steps of 4)
    assert model.model.routers[0].experts[0].count == 12


def test_a_schedule_read_in_random_order_fits_keys_in_the_training_steps(tmp_path):
    # With random sampling the callback cannot tell which examples belong to which task: the steps fit the keys.
    model = make_pmoe()
    probe = TrainingForwardsOfLayerZero(model)
    data = concatenate_datasets([task_dataset(0), task_dataset(0)])
    Trainer(model, training_args(tmp_path, max_steps=8), train_dataset=without_task(data),
            callbacks=[PMoEContinualCallback(task_schedule=[("a", 4), ("b", 4)]), probe]).train()
    assert probe.key_at_first_step == (0, False)
    assert len(probe.calls) == 16  # the expert-free pass ran in every step
    assert [entry.count.item() for entry in model.model.routers[0].experts] == [16, 16]


class SnapshotAtStep(TrainerCallback):
    def __init__(self, step, model):
        self.step, self.model, self.saved, self.saved_head = step, model, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.saved = snapshot(self.model.expert_tensors(0))
            if hasattr(self.model, "score"):  # a classifier's task head
                self.saved_head = self.model.score.weight.detach().clone()


def test_one_run_over_a_task_schedule(tmp_path):
    model = make_pmoe()
    base = snapshot(model.base_parameters())
    data = concatenate_datasets([task_dataset(0), task_dataset(1)])
    args = training_args(tmp_path, max_steps=8, train_sampling_strategy="sequential")
    schedule = schedule_from_task_column(data, args)
    assert schedule == [("task-0", 4), ("task-1", 4)]
    probe, layer_zero = SnapshotAtStep(4, model), TrainingForwardsOfLayerZero(model)
    trainer = Trainer(model, args, train_dataset=without_task(data),
                      callbacks=[PMoEContinualCallback(task_schedule=schedule), probe, layer_zero])
    assert model.config.expert_tasks == ["task-0"]
    trainer.train()

    assert model.config.expert_tasks == ["task-0", "task-1"]
    assert model.config.expert_train_steps == [4, 4]
    assert_identical(model.expert_tensors(0), probe.saved)  # nothing of task 0 moved during task 1
    assert_identical(model.base_parameters(), base)
    # Each task's key was fitted on its own 16 prompts only, each in a pass before the task's first step (the
    # dataset is read in order), so no step ran the expert-free pass.
    assert [entry.count.item() for entry in model.model.routers[0].experts] == [16, 16]
    assert len(layer_zero.calls) == 8
    # The new expert joined the live optimizer, and the scheduler drives its learning rate.
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in model.expert_parameters(1).values())
    assert all(group["lr"] == trainer.lr_scheduler.get_last_lr()[0] for group in trainer.optimizer.param_groups)
    loads = [entry for entry in trainer.state.log_history if "router/load/1_task-1" in entry]
    assert loads and all("router/agreement" in entry for entry in loads)


def test_new_parameter_group_is_scheduled_with_a_custom_optimizer():
    model = make_pmoe()
    model.add_expert("a")
    optimizer = torch.optim.AdamW(list(model.expert_parameters(0).values()), lr=0.1, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    index = model.add_expert("b")
    add_expert_to_optimizer(model, index, optimizer, scheduler)
    assert len(optimizer.param_groups) == 2
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1 * 0.6, 0.1 * 0.6])


def test_router_health_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_pmoe()
    args = training_args(tmp_path, report_to="tensorboard")
    Trainer(model, args, train_dataset=without_task(task_dataset(0)),
            callbacks=[PMoEContinualCallback(tasks=["task-0"])]).train()
    event_files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/router/entropy", "train/router/agreement", "train/router/load/0_task-0"} <= tags


def test_the_callback_moves_before_the_reporting_integrations_or_says_why_not(tmp_path):
    callback = PMoEContinualCallback(tasks=["task-0"])
    trainer = Trainer(make_pmoe(), training_args(tmp_path, report_to="tensorboard"),
                      train_dataset=without_task(task_dataset(0)), callbacks=[callback])
    assert trainer.callback_handler.callbacks[1] is callback  # right after DefaultFlowCallback
    # Outside a Trainer event there is no callback list to find: a loud error, not a silent skip.
    with pytest.raises(RuntimeError, match="could not find the Trainer's callback list"):
        callback._run_before_reporting_callbacks()


def test_resume_after_a_boundary_ends_like_an_uninterrupted_run(tmp_path):
    data = without_task(concatenate_datasets([task_dataset(0), task_dataset(1)]))
    schedule = [("task-0", 4), ("task-1", 4)]

    def run(output_dir, model, resume=None):
        args = training_args(output_dir, max_steps=8, train_sampling_strategy="sequential",
                             save_strategy="steps", save_steps=6)
        trainer = Trainer(model, args, train_dataset=data, callbacks=[PMoEContinualCallback(task_schedule=schedule)])
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "full", make_pmoe())
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert PMoEForCausalLM.from_pretrained(checkpoint).config.expert_tasks == ["task-0", "task-1"]

    resumed = run(tmp_path / "resumed", PMoEForCausalLM.from_pretrained(checkpoint), resume=str(checkpoint))
    assert resumed.config.expert_tasks == uninterrupted.config.expert_tasks
    assert resumed.config.expert_train_steps == [4, 4]
    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ------------------------------------------------------------------------------------------- task heads
def classification_dataset(task: int, examples: int = 16, length: int = 8) -> Dataset:
    """A toy task: is the first token in the low or high half of the task's own 8 tokens?"""
    generator = torch.Generator().manual_seed(task)
    low = 3 + task * 20
    input_ids = torch.randint(low, low + 8, (examples, length), generator=generator)
    return Dataset.from_dict({
        "input_ids": input_ids.tolist(),
        "attention_mask": torch.ones_like(input_ids).tolist(),
        "labels": (input_ids[:, 0] >= low + 4).long().tolist(),
    })


def make_classifier(**overrides):
    torch.manual_seed(0)
    return PMoEForSequenceClassification(tiny_pmoe_config(num_labels=2, **overrides)).eval()


def trainable(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("train_base_weights", [False, True])
def test_resumed_task_trains_what_add_expert_trains_task_head_included(tmp_path, train_base_weights):
    grown = make_classifier(train_base_weights=train_base_weights)
    grown.add_expert("a")
    grown.add_expert("b")
    expected = trainable(grown)
    assert "score.weight" in expected
    grown.save_pretrained(tmp_path / "checkpoint")

    # One Trainer per task: start_task re-activates the interrupted task's expert.
    resumed = PMoEForSequenceClassification.from_pretrained(tmp_path / "checkpoint")
    assert PMoEContinualCallback().start_task(resumed, "b") == 1
    assert trainable(resumed) == expected

    # task_schedule: the Trainer's optimizer is rebuilt with every expert of the run, then the finished ones freeze.
    resumed = PMoEForSequenceClassification.from_pretrained(tmp_path / "checkpoint")
    trainer = Trainer(resumed, training_args(tmp_path / "out", max_steps=8), train_dataset=classification_dataset(0),
                      callbacks=[PMoEContinualCallback(task_schedule=[("a", 4), ("b", 4)])])
    assert trainable(resumed) == expected | set(resumed.expert_parameters(0))
    trainer.state.global_step = 4  # resumed after the boundary
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert trainable(resumed) == expected


def test_classifier_head_trains_over_a_task_schedule_and_resumes_like_an_uninterrupted_run(tmp_path):
    data = concatenate_datasets([classification_dataset(0), classification_dataset(1)])
    schedule = [("task-0", 4), ("task-1", 4)]

    def run(output_dir, model, resume=None):
        args = training_args(output_dir, max_steps=8, train_sampling_strategy="sequential",
                             save_strategy="steps", save_steps=6)
        probe = SnapshotAtStep(4, model)
        trainer = Trainer(model, args, train_dataset=data,
                          callbacks=[PMoEContinualCallback(task_schedule=schedule), probe])
        trainer.train(resume_from_checkpoint=resume)
        return model, probe

    model = make_classifier()
    initial = model.score.weight.detach().clone()
    base = {name: tensor for name, tensor in snapshot(model.base_parameters()).items() if name != "score.weight"}
    uninterrupted, probe = run(tmp_path / "full", model)
    # The head trains during both tasks (as with one Trainer per task), the other base weights stay frozen.
    at_boundary = probe.saved_head
    assert not torch.equal(at_boundary, initial)
    assert not torch.equal(uninterrupted.score.weight, at_boundary)
    assert_identical({name: tensor for name, tensor in uninterrupted.base_parameters().items()
                      if name != "score.weight"}, base)

    checkpoint = tmp_path / "full" / "checkpoint-6"
    resumed, _ = run(tmp_path / "resumed", PMoEForSequenceClassification.from_pretrained(checkpoint),
                     resume=str(checkpoint))
    assert resumed.config.expert_train_steps == [4, 4]
    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ------------------------------------------------------------------------------------------- bad input
def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="more than once"):
        PMoEContinualCallback(tasks=["a", "a"])
    with pytest.raises(ValueError, match="either `tasks`"):
        PMoEContinualCallback(tasks=["a"], task_schedule=[("a", 1)])
    with pytest.raises(ValueError, match="steps >= 1"):
        PMoEContinualCallback(task_schedule=[("a", 0)])


def test_existing_task_name_is_refused(tmp_path):
    model = make_pmoe()
    callback = PMoEContinualCallback()
    callback.start_task(model, "a")
    callback.start_task(model, "b")
    with pytest.raises(ValueError, match="already has expert 0"):
        callback.start_task(model, "a")
    with pytest.raises(ValueError, match="already has an expert"):
        Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
                callbacks=[PMoEContinualCallback(tasks=["a", "b"])])


def test_schedule_that_does_not_add_up_fails_before_training(tmp_path):
    model = make_pmoe()
    with pytest.raises(ValueError, match="adds up to 8 steps but the run is max_steps=5"):
        Trainer(model, training_args(tmp_path / "out", max_steps=5), train_dataset=without_task(task_dataset(0)),
                callbacks=[PMoEContinualCallback(task_schedule=[("a", 4), ("b", 4)])])
    assert model.config.num_experts == 0
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_not_a_pmoe_model(tmp_path):
    with pytest.raises(TypeError, match="needs a PMoE model .* got LlamaForCausalLM"):
        Trainer(make_dense("llama"), training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
                callbacks=[PMoEContinualCallback(tasks=["a"])])


def test_resuming_with_the_wrong_model(tmp_path):
    wrong = make_pmoe()
    wrong.add_expert("b")  # a model whose experts skip the schedule's first task
    with pytest.raises(ValueError, match="do not match task_schedule"):
        Trainer(wrong, training_args(tmp_path, max_steps=8), train_dataset=without_task(task_dataset(0)),
                callbacks=[PMoEContinualCallback(task_schedule=[("a", 4), ("b", 4)])])
    small = make_pmoe()
    small.add_expert("a")
    bigger = make_pmoe()
    bigger.add_expert("a")
    bigger.add_expert("b")
    with pytest.raises(ValueError, match=r"hold experts \[1\] but this model has 1 experts"):
        small.load_state_dict(bigger.state_dict(), strict=False)


def test_task_column_must_be_contiguous_and_whole_steps(tmp_path):
    args = training_args(tmp_path)
    mixed = concatenate_datasets([task_dataset(0, 8), task_dataset(1, 8), task_dataset(0, 8)])
    with pytest.raises(ValueError, match="more than one block"):
        schedule_from_task_column(mixed, args)
    with pytest.raises(ValueError, match="not a multiple of the 4 examples"):
        schedule_from_task_column(task_dataset(0, 6), args)
    with pytest.raises(ValueError, match="no 'task' column"):
        schedule_from_task_column(without_task(task_dataset(0)), args)


def test_growing_inside_a_distributed_run_is_refused_clearly():
    from types import SimpleNamespace

    callback = PMoEContinualCallback(task_schedule=[("a", 4), ("b", 4)])
    for wrapper in (dict(world_size=2), dict(deepspeed="ds.json"), dict(fsdp="full_shard")):
        args = SimpleNamespace(**{"max_steps": 8, "world_size": 1, "deepspeed": None, "fsdp": "", **wrapper})
        with pytest.raises(ValueError, match="one task per Trainer"):
            callback._init_schedule(args, make_pmoe())


def test_a_schedule_continues_a_model_that_already_has_experts(tmp_path):
    model = make_pmoe()
    callback = PMoEContinualCallback()
    callback.start_task(model, "earlier")
    Trainer(model, training_args(tmp_path, max_steps=2), train_dataset=without_task(task_dataset(2)),
            callbacks=[callback]).train()
    earlier = snapshot(model.expert_tensors(0))
    data = concatenate_datasets([task_dataset(0), task_dataset(1)])
    args = training_args(tmp_path, max_steps=8, train_sampling_strategy="sequential")
    Trainer(model, args, train_dataset=without_task(data),
            callbacks=[PMoEContinualCallback(task_schedule=schedule_from_task_column(data, args))]).train()
    assert model.config.expert_tasks == ["earlier", "task-0", "task-1"]
    assert model.config.expert_train_steps == [2, 4, 4]
    assert_identical(model.expert_tensors(0), earlier)


def test_experts_in_the_shallow_layers_train_with_the_callback(tmp_path):
    model = make_pmoe(expert_layers="all")
    base = snapshot(model.base_parameters())
    Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
            callbacks=[PMoEContinualCallback(tasks=["task-0"])]).train()
    shallow = model.model.layers[0].mlp.up_proj.experts[0].lora_B
    assert torch.count_nonzero(shallow) > 0
    assert_identical(model.base_parameters(), base)


def test_new_expert_starts_from_the_nearest_earlier_expert_or_from_zero(tmp_path):
    model = make_pmoe()
    data = without_task(task_dataset(0))
    callback = PMoEContinualCallback(tasks=["first", "same-data", "other"], new_expert_init="nearest")
    Trainer(model, training_args(tmp_path, max_steps=8, learning_rate=2e-2), train_dataset=data,
            callbacks=[callback]).train()
    # The same data again, with a learning rate of 0: the expert keeps its start, the copy of expert 0.
    Trainer(model, training_args(tmp_path, learning_rate=0.0), train_dataset=data, callbacks=[callback]).train()
    for linear in model.expert_linears():
        assert torch.equal(linear.experts[1].lora_B, linear.experts[0].lora_B)
        assert torch.equal(linear.experts[1].lora_A, linear.experts[0].lora_A)
    assert linear.experts[0].lora_B.abs().max() > 0

    # Labels no expert helps with (the untrained model's own greedy tokens): PEFT's init, B = 0.
    batch = {key: torch.tensor(data[key][:4]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        gate = torch.zeros(4, model.config.num_experts)
        batch["labels"] = model(**batch, routing_weights=gate).logits.argmax(-1).roll(1, dims=1)
    assert model.nearest_expert(batch) is None
    other = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    Trainer(model, training_args(tmp_path, learning_rate=0.0), train_dataset=other, callbacks=[callback]).train()
    assert all(linear.experts[2].lora_B.abs().max() == 0 for linear in model.expert_linears())
    assert callback.started_from == {"first": None, "same-data": 0, "other": None}


def test_nearest_expert_is_refused_where_it_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="tasks="):
        PMoEContinualCallback(task_schedule=[("a", 2), ("b", 2)], new_expert_init="nearest")
    with pytest.raises(ValueError, match="new_expert_init"):
        PMoEContinualCallback(tasks=["a"], new_expert_init="copy")
    learned = make_pmoe(router_keys="learned")
    data = without_task(task_dataset(0))
    callback = PMoEContinualCallback(tasks=["a", "b"], new_expert_init="nearest")
    with pytest.raises(ValueError, match="fitted router keys"):
        Trainer(learned, training_args(tmp_path, max_steps=1), train_dataset=data, callbacks=[callback]).train()
    model = make_pmoe(routing="token")
    model.add_expert("a")
    with pytest.raises(ValueError, match="routing='sequence'"):
        model.nearest_expert({"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3).long()})
