# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""Exchange single experts with PEFT LoRA adapters of the dense base model.

A PMoE model made by `PMoEForCausalLM.from_dense(dense)` keeps the dense model's module names
(`model.layers.{i}.self_attn.q_proj`, ...), and each expert is a plain LoRA (`lora_A [r, in]`, `lora_B [out, r]`,
update `scaling * B @ A`) on some of those projections, and on `model.embed_tokens` when it is targeted (PEFT's
`lora_embedding_A [r, vocab]` / `lora_embedding_B [hidden, r]`). So one expert is exactly a PEFT LoRA adapter of the
dense model, restricted to the expert layers:

- `export_expert_to_peft(model, e, path)` writes expert `e` as a standard PEFT adapter (`adapter_config.json` +
  `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(dense, path)` loads; the dense model with it gives
  the PMoE model's outputs with routing forced to expert `e`.
- `import_peft_adapter(model, path, task)` grows a new expert from a PEFT LoRA adapter trained on the dense base.

This module is not part of the remote code shipped with checkpoints. It needs `peft` (the `pmoe[peft]` extra) and
imports it lazily.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import torch
from safetensors.torch import save_file

from .configuration_pmoe import EMBEDDING_TARGET
from .experts_pmoe import PMoEEmbedding, PMoEExperts, PMoELinear
from .growth_pmoe import check_new_task
from .modeling_pmoe import PMoEPreTrainedModel


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EMBEDDING_NAMES = ("embed_tokens", "lm_head")
EMBEDDING_MODULE = f"model.{EMBEDDING_TARGET}"
ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
# PEFT saves adapter tensors under the wrapped model's name, without the adapter name: `base_model.model.<module>.lora_A.weight`.
PEFT_KEY_PREFIX = "base_model.model."
# Embeddings: `<module>.lora_embedding_A` / `.lora_embedding_B` (no `.weight`).
_KEY_PATTERN = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B)\.weight|lora_embedding_(?P<embedding>A|B))$"
)
# PEFT also saves the (unchanged) base embedding of an adapter that targets it (`save_embedding_layers="auto"`).
_EMBEDDING_BASE_KEY = f"{PEFT_KEY_PREFIX}{EMBEDDING_MODULE}.base_layer.weight"
_MODULE_PATTERN = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<name>[A-Za-z0-9_]+)$")
# `init_lora_weights` values whose adapters only reproduce the fine-tuned model on a base whose weights PEFT modified
# (PiSSA/OLoRA/CorDA/LoRA-GA residual, LoftQ quantisation), unless converted with
# `save_pretrained(path_initial_model_for_weight_conversion=...)`, which writes `init_lora_weights=True`.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoRA variants whose forward is not `W x + scaling * B A x` (checked by name too, for PEFT versions without the
# `is_lora_variant` field metadata).
_VARIANT_FIELDS = (
    "use_dora", "alora_invocation_tokens", "velora_config", "monteclora_config", "use_bdlora", "arrow_config",
    "kasa_config", "use_qalora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
)


def _require_peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("PEFT interop needs the `peft` package: `pip install 'pmoe[peft]'`.") from error
    return peft


def _unwrap(linear):
    """A PEFT-wrapped projection (`lora.Linear`) keeps the PMoE linear as its `base_layer`."""
    return getattr(linear, "base_layer", linear)


def _expert_modules_by_dense_name(model: PMoEPreTrainedModel) -> dict[str, PMoEExperts]:
    """`{dense module name: PMoELinear}` for every projection that carries experts, in layer order, named as in the
    dense causal LM (`model.layers.{i}.self_attn.q_proj`), then `{"model.embed_tokens": PMoEEmbedding}` when the
    embedding carries experts."""
    if not isinstance(model, PMoEPreTrainedModel):
        raise TypeError(f"Expected a PMoE model (PMoEPreTrainedModel), got {type(model).__name__}.")
    config = model.config
    layers = model._pmoe_model().layers
    modules = {}
    for layer_idx in config.expert_layer_indices:
        layer = layers[layer_idx]
        for name in config.expert_projections:
            block = "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"
            linear = _unwrap(getattr(getattr(layer, block), name))
            if not isinstance(linear, PMoELinear) or not linear.with_experts:
                raise TypeError(f"model.layers.{layer_idx}.{block}.{name} is not a PMoELinear with experts.")
            modules[f"model.layers.{layer_idx}.{block}.{name}"] = linear
    if config.expert_embeddings:
        embedding = _unwrap(model._pmoe_model().embed_tokens)
        if not isinstance(embedding, PMoEEmbedding) or not embedding.with_experts:
            raise TypeError(f"{EMBEDDING_MODULE} is not a PMoEEmbedding with experts.")
        modules[EMBEDDING_MODULE] = embedding
    return modules


def _peft_keys(module_name: str) -> tuple[str, str]:
    """PEFT's saved names of a module's LoRA A and B."""
    if module_name == EMBEDDING_MODULE:
        return f"{PEFT_KEY_PREFIX}{module_name}.lora_embedding_A", f"{PEFT_KEY_PREFIX}{module_name}.lora_embedding_B"
    return f"{PEFT_KEY_PREFIX}{module_name}.lora_A.weight", f"{PEFT_KEY_PREFIX}{module_name}.lora_B.weight"


def _lora_config_fields(config) -> dict:
    """The `LoraConfig` fields that describe one PMoE expert on the dense model."""
    all_layers = config.expert_layer_indices == list(range(config.num_hidden_layers))
    return dict(
        r=config.expert_rank,
        lora_alpha=config.expert_alpha,
        use_rslora=config.expert_use_rslora,
        lora_dropout=config.expert_dropout,
        target_modules=list(config.expert_target_modules),
        layers_to_transform=None if all_layers else list(config.expert_layer_indices),
        layers_pattern=None if all_layers else "layers",
        bias="none",
        fan_in_fan_out=False,
    )


# --------------------------------------------------------------------------------------------------------- export
@torch.no_grad()
def export_expert_to_peft(
    model: PMoEPreTrainedModel,
    expert_index: int,
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> str:
    """Write expert `expert_index` as a PEFT LoRA adapter of the dense base model; return `save_directory`.

    The adapter is what `peft.get_peft_model(dense, LoraConfig(...)).save_pretrained(save_directory)` writes:
    `adapter_config.json` (`r=expert_rank`, `lora_alpha=expert_alpha`, `use_rslora`, `lora_dropout=expert_dropout`,
    `target_modules=expert_target_modules`, `layers_to_transform` = the expert layers with `layers_pattern="layers"`
    unless experts are in every layer, `bias="none"`) and `adapter_model.safetensors` with PEFT's key names
    (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...; `...embed_tokens.lora_embedding_A` /
    `_B` for an embedding expert). Every targeted module of every expert layer is written, in the model's dtype. The
    unchanged base embedding, which PEFT also saves for an adapter on the embedding (`save_embedding_layers`), is left
    out. Loaded on the dense model the converted PMoE model came from,
    `PeftModel.from_pretrained(dense, save_directory)` computes what the PMoE model computes with the gate forced to
    this expert (`routing_weights` one-hot on it); routers and the other experts are not part of the adapter.

    `base_model_name_or_path` is recorded in the config (PEFT uses it to load the base when none is given); it
    defaults to `config.base_model_name_or_path`, the dense checkpoint `from_dense` converted.
    """
    peft = _require_peft()
    config = model.config
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(config, "base_model_name_or_path", None)
    if isinstance(expert_index, bool) or not isinstance(expert_index, int) or not (
        0 <= expert_index < config.num_experts
    ):
        raise IndexError(f"expert index {expert_index!r} out of range: the model has {config.num_experts} experts.")

    state_dict = {}
    for module_name, module in _expert_modules_by_dense_name(model).items():
        expert = module.experts[expert_index]
        key_a, key_b = _peft_keys(module_name)
        state_dict[key_a] = expert.lora_A.detach().contiguous().clone().cpu()
        state_dict[key_b] = expert.lora_B.detach().contiguous().clone().cpu()

    lora_config = peft.LoraConfig(
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,  # what PeftModel.save_pretrained records
        **_lora_config_fields(config),
    )
    os.makedirs(save_directory, exist_ok=True)
    lora_config.save_pretrained(save_directory)
    # The metadata PEFT writes (`format: pt`), so loaders that check it accept the file.
    save_file(state_dict, os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return str(save_directory)


# --------------------------------------------------------------------------------------------------------- import
def _pattern_value(patterns: dict, module_name: str, default):
    """A module's value in PEFT's `rank_pattern` / `alpha_pattern`, looked up as PEFT does (`get_pattern_key`)."""
    from peft.utils.other import get_pattern_key

    patterns = patterns or {}
    return patterns.get(get_pattern_key(list(patterns), module_name), default)


def _load_adapter_state_dict(adapter_path: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read by PEFT (`load_peft_weights`) from `adapter_model.safetensors` only."""
    from peft.utils import load_peft_weights

    if os.path.isfile(os.path.join(adapter_path, SAFETENSORS_WEIGHTS_NAME)):
        return load_peft_weights(adapter_path, device="cpu")
    bin_file = os.path.join(adapter_path, BIN_WEIGHTS_NAME)
    if os.path.isfile(bin_file):
        # Same rule as PMoEPreTrainedModel.from_pretrained: safetensors only, never unpickle (not even weights_only,
        # whose restricted unpickler has had bypasses, CVE-2025-32434), which load_peft_weights would do here.
        raise ValueError(
            f"The PEFT adapter {adapter_path!r} has its weights in {bin_file!r}, a pickle file: pmoe loads adapter "
            f"weights only from {SAFETENSORS_WEIGHTS_NAME}, because unpickling can run code. If you trust the "
            "adapter, convert it with PEFT (`peft.PeftModel.from_pretrained(dense_model, adapter_path)"
            ".save_pretrained(new_path)` writes adapter_model.safetensors) and import `new_path`."
        )
    raise FileNotFoundError(f"No adapter weights in {adapter_path!r}: expected {SAFETENSORS_WEIGHTS_NAME}.")


def _check_lora_config(lora_config, config, problems: list[str]):
    """Config-level reasons an adapter cannot be one PMoE expert."""
    peft_type = getattr(lora_config.peft_type, "value", lora_config.peft_type)
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') can become PMoE experts.")
        return
    variants = set(_VARIANT_FIELDS)
    variants |= {field.name for field in dataclasses.fields(lora_config) if field.metadata.get("is_lora_variant")}
    for name in sorted(variants):
        value = getattr(lora_config, name, None)
        if value:
            label = "DoRA (use_dora=True)" if name == "use_dora" else f"{name}={value!r}"
            problems.append(
                f"{label} is not representable: a PMoE expert is a plain LoRA update scaling * B @ A on the base "
                "linear (no DoRA / aLoRA / QA-LoRA / LoRA bias / other LoRA variants, layer replication, target "
                "parameters or trainable tokens)."
            )
    init = getattr(lora_config, "init_lora_weights", True)
    init_field = {field.name: field for field in dataclasses.fields(lora_config)}.get("init_lora_weights")
    init_variants = tuple(init_field.metadata.get("lora_variants", ())) if init_field is not None else ()
    if isinstance(init, str) and init_variants and init.lower().startswith(init_variants):
        problems.append(f"init_lora_weights={init!r} is a LoRA variant, not representable as a plain LoRA expert.")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        problems.append(
            f"init_lora_weights={init!r}: this initialisation modifies the base weights, so the adapter only works on "
            "PEFT's modified base. Save it with `save_pretrained(..., path_initial_model_for_weight_conversion=...)` "
            "to convert it to a plain LoRA of the original base first."
        )
    if getattr(lora_config, "bias", "none") not in (None, "none"):
        problems.append(
            f"bias={lora_config.bias!r}: the adapter trains base biases, which PMoE experts cannot hold (they are "
            "shared base weights). Only bias='none' adapters can be imported."
        )
    if getattr(lora_config, "modules_to_save", None):
        problems.append(
            f"modules_to_save={list(lora_config.modules_to_save)}: fully trained modules are not representable as a "
            "LoRA expert."
        )
    if getattr(lora_config, "fan_in_fan_out", False):
        problems.append("fan_in_fan_out=True: the adapter was made for Conv1D (transposed) weights, not a Llama-family "
                        "nn.Linear.")
    targets = lora_config.target_modules
    if isinstance(targets, (list, tuple, set)):
        for target in sorted(targets):
            name = target.rsplit(".", 1)[-1]
            if name in EMBEDDING_NAMES and name not in config.expert_target_modules:
                problems.append(
                    f"target module {target!r}: embedding / LM-head LoRA is not representable (PMoE experts live "
                    f"only on {list(config.expert_target_modules)})."
                )
            elif name not in config.expert_target_modules:
                problems.append(
                    f"target module {target!r} is not in config.expert_target_modules="
                    f"{list(config.expert_target_modules)}."
                )


def _check_tensors(state_dict, lora_config, config, modules, problems: list[str]) -> dict:
    """Tensor-level checks; returns `{dense module name: (lora_A, lora_B, adapter scaling)}` for a valid adapter."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key == _EMBEDDING_BASE_KEY and EMBEDDING_MODULE in modules:
            if not torch.equal(tensor.to(modules[EMBEDDING_MODULE].weight), modules[EMBEDDING_MODULE].weight):
                problems.append(f"adapter tensor {key!r} differs from this model's token embedding: the adapter "
                                "changes the base embedding, or was trained on another base model.")
            continue
        match = _KEY_PATTERN.match(key)
        if match is None:
            problems.append(
                f"adapter tensor {key!r} is not a LoRA A/B weight of a module ({PEFT_KEY_PREFIX}<module>.lora_A.weight "
                "/ .lora_B.weight): not representable as a PMoE expert."
            )
            continue
        module_name = match["module"]
        if module_name.startswith("layers."):  # an adapter of the bare decoder (`LlamaModel`): same modules
            module_name = f"model.{module_name}"
        factor = match["factor"] or f"lora_{match['embedding']}"
        by_module.setdefault(module_name, {})[factor] = tensor
    if not by_module and not problems:
        problems.append("the adapter holds no LoRA tensors.")

    expert_layers = config.expert_layer_indices
    entries = {}
    for module_name in sorted(by_module):
        factors = by_module[module_name]
        if module_name not in modules:
            parts = _MODULE_PATTERN.match(module_name)
            short = module_name.rsplit(".", 1)[-1]
            if short in EMBEDDING_NAMES:
                problems.append(f"adapter targets {module_name!r}: embedding / LM-head LoRA is not representable.")
            elif parts is None:
                problems.append(f"adapter targets {module_name!r}, which is not a decoder-layer projection "
                                "(model.layers.{i}.self_attn|mlp.<name>).")
            elif int(parts["layer"]) >= config.num_hidden_layers:
                problems.append(f"adapter targets {module_name!r}, but the model has {config.num_hidden_layers} "
                                "layers: was it trained on another base model?")
            elif parts["name"] not in config.expert_target_modules:
                problems.append(f"adapter targets {module_name!r}: {parts['name']!r} is not in "
                                f"config.expert_target_modules={list(config.expert_target_modules)}.")
            elif int(parts["layer"]) not in expert_layers:
                problems.append(
                    f"adapter targets {module_name!r}: layer {parts['layer']} has no experts (experts are in layers "
                    f"{expert_layers[0]}..{expert_layers[-1]}: expert_layers={config.expert_layers!r}, "
                    f"num_shallow_layers={config.num_shallow_layers})."
                )
            else:
                problems.append(f"adapter targets {module_name!r}, which does not match this model's layout.")
            continue
        if set(factors) != {"lora_A", "lora_B"}:
            problems.append(f"adapter module {module_name!r} has {sorted(factors)} but needs both lora_A and lora_B.")
            continue
        lora_a, lora_b = factors["lora_A"], factors["lora_B"]
        in_features, out_features = modules[module_name].expert_shape
        rank = _pattern_value(lora_config.rank_pattern, module_name, lora_config.r)
        alpha = _pattern_value(lora_config.alpha_pattern, module_name, lora_config.lora_alpha)
        expected_a, expected_b = (rank, in_features), (out_features, rank)
        if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
            kind = "embedding" if module_name == EMBEDDING_MODULE else "linear"
            problems.append(
                f"adapter module {module_name!r} has lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)}, "
                f"expected {expected_a} / {expected_b} (rank {rank} on a {in_features} -> {out_features} {kind}): "
                "was it trained on another base model?"
            )
            continue
        if rank > config.expert_rank:
            problems.append(
                f"adapter module {module_name!r} has rank {rank} > config.expert_rank={config.expert_rank}; "
                "convert the dense model with expert_rank >= the adapter's rank (lower ranks are zero-padded)."
            )
            continue
        scaling = alpha / math.sqrt(rank) if lora_config.use_rslora else alpha / rank
        entries[module_name] = (lora_a, lora_b, scaling)
    return entries


@torch.no_grad()
def import_peft_adapter(
    model: PMoEPreTrainedModel, adapter_path: str | os.PathLike, task: str, freeze_previous: bool = True
) -> int:
    """Grow a new expert for `task` from a PEFT LoRA adapter of the dense base model; return its index.

    `adapter_path` is a local folder with `adapter_config.json` and `adapter_model.safetensors`, as
    `PeftModel.save_pretrained` writes, for the dense model this PMoE model was converted from. A pickle
    `adapter_model.bin` (older PEFT, `safe_serialization=False`) is refused with a `ValueError`, since unpickling can
    run code: convert a trusted one by loading it with PEFT and saving it again (safetensors by default). Every check
    runs before the expert is added, so a refused adapter leaves the model unchanged. The adapter is refused
    (`ValueError` naming the problem) when it is not a LoRA; uses DoRA or another LoRA variant, `bias != "none"`,
    `modules_to_save`, or a base-modifying initialisation (PiSSA, LoftQ, ... unconverted); targets the LM head, a
    module outside `config.expert_target_modules` (the embedding included), or a layer without experts (the shallow
    layers when `expert_layers="deep"`); or has a rank above `config.expert_rank`.

    Rank and scale: a module of rank `r_a < expert_rank` is zero-padded (extra rows of A and columns of B are 0, so
    `B @ A` is unchanged and the padding stays 0 under training). PEFT scales the update by `s_a = alpha / r_a`
    (`alpha / sqrt(r_a)` with rsLoRA; per module with `rank_pattern` / `alpha_pattern`) and PMoE by
    `s = config.expert_scaling`, so B is stored as `B * s_a / s`: the update is the adapter's. When `s_a == s` (same
    rank, alpha and rsLoRA setting) the tensors are copied bit for bit; otherwise B is rescaled, which rounds (the
    update equals the adapter's up to float rounding). The adapter's `lora_dropout` is a training setting and is not
    carried over (the expert uses `config.expert_dropout`).

    Modules the adapter does not target get no update (a zero LoRA B, or a zero A for the embedding). PEFT saves the
    base embedding of an adapter that targets it; it must equal this model's. The new expert is added with
    `model.add_expert(task, freeze_previous)` (trainable, `training_expert`). With Gaussian router keys its key is
    unfitted and scores `-inf` until features are accumulated for it (train on the task, or force routing with
    `routing_weights`); with learned keys it starts at zero.
    """
    peft = _require_peft()
    adapter_path = os.fspath(adapter_path)
    if not os.path.isfile(os.path.join(adapter_path, ADAPTER_CONFIG_NAME)):
        raise FileNotFoundError(f"{adapter_path!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG_NAME}).")
    config = model.config
    check_new_task(config, task, "import_peft_adapter")

    peft_config = peft.PeftConfig.from_pretrained(adapter_path)
    problems: list[str] = []
    _check_lora_config(peft_config, config, problems)
    entries = {}
    if not problems:
        modules = _expert_modules_by_dense_name(model)
        entries = _check_tensors(_load_adapter_state_dict(adapter_path), peft_config, config, modules, problems)
    if problems:
        raise ValueError(f"Cannot import the PEFT adapter {adapter_path!r} as a PMoE expert:\n- " + "\n- ".join(problems))

    index = model.add_expert(task, freeze_previous=freeze_previous)
    target_scaling = config.expert_scaling
    for module_name, module in _expert_modules_by_dense_name(model).items():
        expert = module.experts[index]
        if module_name not in entries:
            continue  # not targeted: no update (add_expert made B zero, or A for the embedding)
        lora_a, lora_b, scaling = entries[module_name]
        rank = lora_a.shape[0]
        if scaling != target_scaling:
            lora_b = (lora_b.double() * (scaling / target_scaling)).to(expert.lora_B.dtype)
        expert.lora_A.zero_()
        expert.lora_B.zero_()
        expert.lora_A[:rank].copy_(lora_a)
        expert.lora_B[:, :rank].copy_(lora_b)
    return index


__all__ = ["export_expert_to_peft", "import_peft_adapter"]
