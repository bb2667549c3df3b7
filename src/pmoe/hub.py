# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""The Hub side of a PMoE model: its model card, its continual-learning record and `push_to_hub` with that card.

Not shipped with checkpoints: this is pmoe the installed package. `import pmoe` gives `PMoEPreTrainedModel` these three
as methods (`model.push_to_hub(...)`, `model.model_card()`, `model.record_task_scores(...)`, see
`add_hub_methods`). A model loaded as remote code (its own copy of the classes, pmoe not needed) pushes with
transformers' own `push_to_hub`: weights, config and code with transformers' generic card; where pmoe is installed,
`pmoe.hub.push_to_hub(model, repo_id)` gives it the PMoE card too.
"""

import os
import tempfile

from transformers import GenerationMixin
from transformers.utils.hub import ModelCard, ModelCardData, hf_api

from .metrics import continual_metrics


def push_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                license: str | None = None, model_card=None) -> str:
    """`PreTrainedModel.push_to_hub` with a PMoE model card (`make_model_card(model, ...)`, or `model_card` if given)
    instead of transformers' generic one. The card is regenerated on every push, so its expert table and results
    follow the model; its tags are `tags` plus the model's `model_tags` (as transformers' push adds them). Returns the
    commit info of the upload."""
    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    tags = [*(tags or []), *(getattr(model, "model_tags", None) or [])]
    card = model_card if model_card is not None else make_model_card(model, repo_id, tags=tags, license=license)
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, max_shard_size=max_shard_size)
        card.save(os.path.join(work_dir, "README.md"))
        return model._upload_modified_files(
            work_dir, repo_id, files_timestamps={}, commit_message=commit_message or "Upload PMoE model",
            token=token, create_pr=create_pr, revision=revision, commit_description=commit_description,
        )


def make_model_card(model, repo_id: str | None = None, tags: list[str] | None = None, license: str | None = None):
    """A Hub model card (`huggingface_hub.ModelCard`): metadata (base model, library, tags, license), the layout,
    the expert table (task, index, parameters, training steps), the recorded accuracy matrix with LA / OP / BWT,
    and how to load the model without a task id (`model.model_card(...)`)."""
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        base_model=config.base_model_name_or_path or None,
        license=license,
        tags=list(dict.fromkeys([*(tags or []), "pmoe", "continual-learning", "mixture-of-experts", "lora",
                                 "custom_code"])),
        pipeline_tag="text-generation" if isinstance(model, GenerationMixin) else None,
    )
    name = repo_id or config.base_model_name_or_path or "PMoE model"
    deep = f"layers {config.num_shallow_layers}-{config.num_hidden_layers - 1}"
    placement = "every layer" if config.expert_layers == "all" else f"the deep block ({deep})"
    lines = [
        f"# {name}", "",
        f"A PMoE model (progressive mixture of LoRA experts, made with [pmoe](https://github.com/pmoe/pmoe)) "
        f"{'converted from `' + config.base_model_name_or_path + '`' if config.base_model_name_or_path else ''}"
        f": {config.num_hidden_layers} layers, the first {config.num_shallow_layers} shallow; one LoRA expert "
        f"(rank {config.expert_rank}, alpha {config.expert_alpha:g}) per task on {', '.join(config.expert_target_modules)} "
        f"of {placement}. A router ({config.routing} routing, {config.router_keys} keys) picks the experts from "
        "the model's own features, so no task id is needed at inference.", "",
        "## Experts", "",
        "| expert | task | parameters | training steps |", "|---|---|---|---|",
    ]
    for index, task in enumerate(config.expert_tasks):
        parameters = sum(param.numel() for param in model.expert_parameters(index).values())
        lines.append(f"| {index} | {task} | {parameters:,} | {config.expert_train_steps[index]:,} |")
    if not config.expert_tasks:
        lines.append("| - | (no experts yet) | 0 | 0 |")
    matrix = config.accuracy_matrix or []
    if matrix:
        tasks = config.expert_tasks[: max(len(row) for row in matrix)]
        cell = lambda value: "-" if value is None else f"{100 * value:.1f}"  # noqa: E731
        lines += ["", f"## Continual-learning results ({config.accuracy_metric or 'score'}, %)", "",
                  "Row i: every task's score measured after training task i.", "",
                  "| trained up to | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for i, row in enumerate(matrix):
            padded = list(row) + [None] * (len(tasks) - len(row))
            label = tasks[i] if i < len(tasks) else str(i)
            lines.append(f"| {label} | " + " | ".join(cell(value) for value in padded) + " |")
        summary = record_summary(matrix)
        if summary:
            lines += ["", " · ".join(f"{key} {100 * value:+.1f}" if key == "BWT" else f"{key} {100 * value:.1f}"
                                     for key, value in summary.items())]
    lines += [
        "", "## Usage", "",
        "The modeling code ships with the checkpoint; `pmoe` need not be installed:", "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id or "path/to/checkpoint"}", trust_remote_code=True)',
        "```", "",
        "To keep training it on new tasks (one new expert per task, earlier ones frozen), `pip install pmoe` and "
        "use `pmoe.PMoEContinualCallback` with the `Trainer`.",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def record_task_scores(model, scores: dict[str, float], metric: str = "accuracy"):
    """Append one row to the continual-learning record (`config.accuracy_matrix`): the score on each task so far,
    measured after training the latest one (tasks missing from `scores` are left empty). The model card shows it."""
    config = model.config
    unknown = sorted(set(scores) - set(config.expert_tasks))
    if unknown:
        raise ValueError(f"record_task_scores: unknown task(s) {unknown}; the model's tasks are {config.expert_tasks}.")
    if config.accuracy_metric not in (None, metric):
        raise ValueError(
            f"record_task_scores: the record holds {config.accuracy_metric!r} scores; got {metric!r}."
        )
    row = [None if scores.get(task) is None else float(scores[task]) for task in config.expert_tasks]
    config.accuracy_matrix = [*(config.accuracy_matrix or []), row]
    config.accuracy_metric = metric


def record_summary(matrix: list[list[float | None]]) -> dict[str, float]:
    """LA, OP and BWT (`metrics.continual_metrics`) of a continual-learning record, whose rows may be partial (row i
    holds the tasks up to i); empty when the diagonal or the last row is incomplete."""
    size = len(matrix)
    square = [[*row[:size], *[None] * (size - len(row))] for row in matrix]
    if any(square[i][i] is None for i in range(size)) or any(value is None for value in square[-1]):
        return {}
    metrics = continual_metrics([[0.0 if value is None else value for value in row] for row in square])
    return {key: metrics[key] for key in (("LA", "OP", "BWT") if size > 1 else ("LA", "OP"))}


def add_hub_methods(model_class):
    """Make `push_to_hub` (with the PMoE card), `model_card` and `record_task_scores` methods of `model_class` (pmoe's
    `PMoEPreTrainedModel`, at import). They live here rather than in the shipped modeling code, which must not carry
    Hub and reporting code into every checkpoint."""
    model_class.push_to_hub = push_to_hub
    model_class.model_card = make_model_card
    model_class.record_task_scores = record_task_scores
