# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""Load-time checks of PMoE checkpoints: weights only from safetensors, and a loaded model that is exactly what was
saved or a `ValueError` that names every tensor that is not (never a half-loaded model with random experts).

Shipped inside every checkpoint as remote code with `modeling_pmoe.py`: it imports only `os` (a read-only path check)
and its siblings.
"""

import os
from collections.abc import Callable

from .experts_pmoe import expert_index_of


HEADS = ("lm_head", "score")


def load_from_safetensors(load: Callable, source, *model_args, **kwargs):
    """`load(source, ...)` (transformers' `from_pretrained`) from safetensors only, returning `(model, loading_info)`.

    `use_safetensors=False` and a single weights file that is not `.safetensors` are refused, since unpickling can run
    code; a folder without safetensors weights and a truncated / corrupted `.safetensors` file give an `OSError` that
    says so. Shapes are not checked here (`ignore_mismatched_sizes=True`): `check_loaded_weights` explains them."""
    if kwargs.get("use_safetensors", True) is False:
        raise ValueError(
            "pmoe loads weights only from safetensors: use_safetensors=False is not supported, because pickle "
            "files (pytorch_model.bin) can run code when loaded. Drop the argument."
        )
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and not str(source).endswith(".safetensors"):
        raise ValueError(
            f"pmoe loads weights only from safetensors, and {str(source)!r} is not a .safetensors file (pickle "
            "files can run code when loaded). Pass the checkpoint folder that save_pretrained wrote."
        )
    kwargs["use_safetensors"] = True
    try:
        return load(source, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except OSError as error:
        message = str(error)
        if "model.safetensors" in message and (
            "no file named" in message or "does not appear to have a file named" in message
        ):
            raise OSError(
                f"No safetensors weights in {str(source)!r}: pmoe loads weights only from model.safetensors (or "
                "model.safetensors.index.json and its shards) and refuses pickle files such as pytorch_model.bin, "
                "which can run code when loaded. Re-save the model with save_pretrained, or convert trusted "
                f"pickle weights with safetensors.torch.save_file. (transformers: {message})"
            ) from error
        raise
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors' error class, matched without importing it
            raise
        raise OSError(
            f"The weights of {str(source)!r} cannot be read: a .safetensors file is truncated or its header is "
            f"corrupted ({error}). Download or save the checkpoint again."
        ) from error


def check_loaded_weights(model, loading_info: dict, source, ignore_mismatched_sizes: bool, class_name: str):
    """Raise a `ValueError` listing every tensor of `model` the checkpoint did not fill as saved: missing, unexpected
    or of another shape (see `PMoEPreTrainedModel.from_pretrained`)."""
    config = model.config
    problems = [
        *missing_tensor_problems(model, loading_info["missing_keys"]),
        *unexpected_tensor_problems(config, loading_info["unexpected_keys"]),
        *mismatched_shape_problems(config, loading_info["mismatched_keys"], ignore_mismatched_sizes),
    ]
    if problems:
        where = repr(str(source)) if source is not None else "the state_dict passed"
        raise ValueError(
            f"Cannot load {class_name} from {where}: the weights do not match config.json (num_experts="
            f"{config.num_experts}, expert_tasks={config.expert_tasks}, expert_rank={config.expert_rank}). "
            "Nothing is returned: transformers would re-initialise these tensors at random, a half-loaded model.\n"
            + "\n".join(f"- {problem}" for problem in problems)
            + "\nFix config.json so that it describes the saved weights (num_experts, expert_tasks, "
            "expert_train_steps, expert_rank, model sizes), or load the folder exactly as save_pretrained wrote it."
        )


def examples(names, limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# The screens (`router_screen_margin`), which checkpoints from before them lack, and every module holding router keys.
SCREEN_MODULE_NAMES = ("screen_router", "first_layer_screen_router")
ROUTER_MODULE_NAMES = frozenset({"routers", *SCREEN_MODULE_NAMES})


def screen_of(name: str) -> str | None:
    """The screen a tensor belongs to (`model.screen_router....`, `model.first_layer_screen_router....`), if any."""
    parts = name.split(".")
    return next((screen for screen in SCREEN_MODULE_NAMES if screen in parts), None)


def missing_tensor_problems(model, missing_keys) -> list[str]:
    config, problems = model.config, []
    missing = set(missing_keys)
    # Allowed: a new task head (a classifier loaded from a causal LM checkpoint) and router usage counts, which
    # checkpoints from before expert merging lack (zero, as in a fresh model).
    missing -= {name for name in missing if name.split(".")[0] in model._trainable_task_heads}
    missing -= {name for name in missing if name.endswith(".usage") and "routers" in name.split(".")}
    # A screen that checkpoints from before it lack entirely: its keys stay unfitted, which keeps it off (prompts are
    # routed as when the checkpoint was saved). (The model's names are listed only when a screen tensor is missing.)
    absent, model_names = set(), None
    for screen in SCREEN_MODULE_NAMES:
        screen_missing = {name for name in missing if screen_of(name) == screen}
        if screen_missing:
            model_names = model.state_dict().keys() if model_names is None else model_names
            if screen_missing == {name for name in model_names if screen_of(name) == screen}:
                absent.add(screen)
                missing -= screen_missing
    missing_by_expert = {}
    for name in missing:
        index = expert_index_of(name)
        if index is not None:
            missing_by_expert.setdefault(index, []).append(name)
    for index, names in sorted(missing_by_expert.items()):
        task = config.expert_tasks[index] if index < len(config.expert_tasks) else None
        total = len([name for name in model.expert_tensors(index) if screen_of(name) not in absent]
                    if index < config.num_experts else names)
        if len(names) == total:
            problems.append(
                f"expert {index} ({task!r}) is in config.json but none of its {total} tensors is in the weights "
                f"(e.g. {examples(names, 2)}): config.json lists more experts than were saved."
            )
        else:
            problems.append(
                f"{len(names)} of the {total} tensors of expert {index} ({task!r}) are missing from the weights: "
                f"{examples(names)}. The weights file is incomplete (a tensor was removed or a shard is missing)."
            )
    other_missing = sorted(name for name in missing if expert_index_of(name) is None)
    if other_missing:
        problems.append(f"{len(other_missing)} tensor(s) are missing from the weights: {examples(other_missing)}.")
    return problems


def unexpected_tensor_problems(config, unexpected_keys) -> list[str]:
    problems = []
    unexpected = set(unexpected_keys)
    extra_experts = sorted({index for name in unexpected if (index := expert_index_of(name)) is not None})
    if extra_experts:
        names = [name for name in unexpected if expert_index_of(name) is not None]
        beyond = [index for index in extra_experts if index >= config.num_experts]
        hint = ("config.json lists fewer experts than were saved" if beyond else
                "config.json builds these experts elsewhere (expert_layers, expert_target_modules or router "
                "settings differ from the ones the weights were saved with)")
        problems.append(
            f"the weights hold {len(names)} tensor(s) of expert(s) {extra_experts} that a model built from "
            f"config.json does not have: {examples(names)}; {hint}."
        )
    other_unexpected = sorted(
        name for name in unexpected if expert_index_of(name) is None and name.split(".")[0] not in HEADS
    )
    if other_unexpected:
        problems.append(
            f"the weights hold {len(other_unexpected)} tensor(s) that a model built from config.json does not "
            f"have: {examples(other_unexpected)} (num_hidden_layers, expert_layers or router settings may differ)."
        )
    return problems


def mismatched_shape_problems(config, mismatched_keys, ignore_mismatched_sizes: bool) -> list[str]:
    shapes_by_cause = {}
    for name, saved, built in sorted(mismatched_keys, key=lambda item: item[0]):
        is_pmoe_tensor = expert_index_of(name) is not None or ROUTER_MODULE_NAMES & set(name.split("."))
        if ignore_mismatched_sizes and not is_pmoe_tensor:
            continue  # the caller asked transformers to re-initialise base weights of another shape
        saved, built = list(saved), list(built)
        shapes_by_cause.setdefault(mismatch_cause(config, name, saved, built), []).append(
            f"{name} has shape {saved} in the weights but {built} in a model built from config.json"
        )
    problems = []
    for cause, shapes in shapes_by_cause.items():
        more = f"; and {len(shapes) - 2} more tensor(s) like them" if len(shapes) > 2 else ""
        problems.append("; ".join(shapes[:2]) + more + f". Likely cause: {cause}.")
    return problems


def mismatch_cause(config, name: str, saved: list[int], built: list[int]) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "lora_A" and len(saved) == 2 and saved[1:] == built[1:]:
        return (f"the saved experts have rank {saved[0]} but config.expert_rank is {config.expert_rank}: "
                "expert_rank in config.json was changed")
    if leaf == "lora_B" and len(saved) == 2 and saved[:1] == built[:1]:
        return (f"the saved experts have rank {saved[1]} but config.expert_rank is {config.expert_rank}: "
                "expert_rank in config.json was changed")
    if leaf == "usage" and len(saved) == 1:
        return (f"the saved routers count {saved[0]} experts but config.num_experts is {config.num_experts}: "
                "num_experts / expert_tasks in config.json do not match the weights")
    if name.split(".")[0] in HEADS:
        return ("the head was saved with another size (num_labels or vocab_size); pass "
                "ignore_mismatched_sizes=True to start a new head")
    return ("the model sizes in config.json (hidden_size, intermediate_size, num_attention_heads, "
            "num_key_value_heads, head_dim, vocab_size) do not match the weights")
