# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""PyTorch PMoE: a Llama-family decoder whose projections carry progressive LoRA experts, one per task.

Layout (see PMoEConfig): layers [0, S) are the shallow block, layers [S, L) the deep block. Each targeted projection
of an expert layer (every layer by default, the deep ones with `expert_layers="deep"`) is a `PMoELinear` that carries
one LoRA expert per task. A router at the boundary reads the hidden state leaving the shallow block (by default from an
expert-free pass, once per sequence) and gives the gates every expert layer uses. Weight names follow transformers'
Llama layout, so Llama / Mistral / Qwen2 / Qwen3 checkpoints convert by copying, and expert weights sit at
`...q_proj.experts.{e}.lora_A` / `.lora_B`, one tensor per expert.

This file holds the layers, `PMoEPreTrainedModel`, `PMoEModel` (where its gate comes from: `PMoEGateMixin`) and the
heads; the experts, router keys, router and routing functions are in `experts_pmoe.py`, the growth API in
`growth_pmoe.py`, the load-time checks in `loading_pmoe.py`. All of them ship inside every checkpoint as remote code
and import only torch, transformers and each other.
"""

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_pmoe import SUPPORTED_DENSE_ARCHITECTURES, PMoEConfig
from .experts_pmoe import (
    PMoEEmbedding,
    PMoEEmbeddingExpert,
    PMoELinear,
    PMoELoRAExpert,
    PMoERouter,
    PMoERouterKey,
    expert_index_of,
    expert_gate_inputs,
    route,
    screen_is_sure,
)
from .growth_pmoe import PMoEGrowthMixin
from .loading_pmoe import ROUTER_MODULE_NAMES, check_loaded_weights, load_from_safetensors


try:  # the context that `capture_outputs` records into (transformers 5.23 and 5.24)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # a later transformers: the pre-pass may then appear in output_hidden_states
    _active_collector = None


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------ transformers versions
# transformers 5.24 renamed the KV cache argument of model forwards, masks, decoder layers and model outputs from
# `past_key_values` to `cache` (the old name is a deprecated alias until 5.40). This file ships inside checkpoints and
# outlives the transformers release that wrote it, so it follows the installed version: every call into transformers
# and every output uses `CACHE_KWARG`, and PMoE's forwards accept both names. The next rename is this line.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def one_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache a forward was given under either name (`cache` from transformers 5.24, `past_key_values` before)."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError(
            "Got two different KV caches, `cache` and `past_key_values`: pass one (they are the same argument)."
        )
    return past_key_values


@contextlib.contextmanager
def outputs_not_captured():
    """Run modules without `capture_outputs` recording them (the expert-free pre-pass is not one of the model's layers
    as far as `output_hidden_states` / `output_attentions` are concerned)."""
    if _active_collector is None:
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)


class PMoERMSNorm(LlamaRMSNorm):
    pass


class PMoERotaryEmbedding(LlamaRotaryEmbedding):
    pass


# ----------------------------------------------------------------------------------------------- input checks
def _reads_values(tensor: torch.Tensor, length: int) -> bool:
    """Whether the checks that read an input's values (token id range, finite embeddings / gates) run.

    They need a host read of one small reduction. On CPU that costs nothing next to the forward, so they always run.
    On an accelerator the read is a device sync: it runs for multi-token inputs (prefill, training), where one sync
    is negligible next to the forward and the first out-of-range id would otherwise be a device-side assert, but not
    at single-token decode steps (whose ids and gates `generate` made itself) nor under torch.compile (a host read
    would break the graph). transformers' own models check none of this."""
    if tensor.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or length > 1


def check_not_empty(inputs: torch.Tensor, name: str):
    # LlamaForCausalLM fails on empty input with "cannot reshape tensor of 0 elements"; there is no output to define
    # for an empty sequence (no position to predict from), so both empty cases are refused alike.
    if inputs.dim() >= 2 and 0 in inputs.shape[:2]:
        raise ValueError(
            f"{name} is empty (shape {tuple(inputs.shape)}): PMoE needs at least one sequence of at least one token."
        )


def check_labels(labels: torch.Tensor, given: torch.Tensor | None):
    """Language-modeling labels `[B, T]` must match the input's batch and length."""
    if given is not None and given.dim() >= 2 and labels.shape != given.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the input is {tuple(given.shape[:2])}: they must match."
        )


def check_attention_mask(attention_mask, batch_size: int, length: int, has_cache: bool, name: str = "attention_mask"):
    """A 2D mask must be `(batch_size, length)`, or `(batch_size, cached + length)` with a cache (dicts of prebuilt
    masks and custom 4D masks are not checked)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    rows, columns = attention_mask.shape
    if rows != batch_size or (columns != length if not has_cache else columns < length):
        expected = f"({batch_size}, {length})" if not has_cache else f"({batch_size}, past + {length})"
        raise ValueError(
            f"{name} has shape {tuple(attention_mask.shape)} but the input is {batch_size} sequences of {length} "
            f"tokens: expected {expected}."
        )


def check_model_inputs(
    config: PMoEConfig,
    vocab_size: int,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask,
    routing_weights: torch.Tensor | None,
    routing_mask: torch.Tensor | None,
    has_cache: bool,
):
    """Clear errors for bad inputs, before they fail deep inside the model (or silently give NaN)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        raise ValueError(
            f"inputs_embeds must have shape (batch_size, sequence_length, hidden_size={config.hidden_size}), got "
            f"{tuple(inputs_embeds.shape)}."
        )
    given = input_ids if input_ids is not None else inputs_embeds
    check_not_empty(given, "input_ids" if input_ids is not None else "inputs_embeds")
    batch_size, length = given.shape[:2]
    check_attention_mask(attention_mask, batch_size, length, has_cache)
    if routing_mask is not None:
        if routing_mask.dim() != 2 or routing_mask.shape[0] != batch_size or routing_mask.shape[1] < length:
            raise ValueError(
                f"routing_mask must have shape (batch_size, sequence_length) = ({batch_size}, {length}) (or cover "
                f"cached tokens too), got {tuple(routing_mask.shape)}."
            )
    if routing_weights is not None:
        if config.routing != "sequence":
            raise ValueError(
                f"routing_weights are sequence-routing gates, but this model routes with routing='{config.routing}'."
            )
        if routing_weights.shape != (batch_size, config.num_experts):
            raise ValueError(
                f"routing_weights must have shape (batch_size, num_experts) = "
                f"({batch_size}, {config.num_experts}), got {tuple(routing_weights.shape)}."
            )
        if _reads_values(routing_weights, length) and not bool(
            (torch.isfinite(routing_weights) & (routing_weights >= 0)).all()
        ):
            raise ValueError(
                "routing_weights must be finite and >= 0 (a row of zeros means no expert), got "
                f"{routing_weights.tolist() if routing_weights.numel() <= 16 else 'NaN, inf or negative values'}."
            )
    if input_ids is not None and _reads_values(input_ids, length):
        low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids must be token ids in [0, vocab_size) = [0, {vocab_size}), got ids from {low} to {high}."
            )
    if inputs_embeds is not None and _reads_values(inputs_embeds, length):
        # One elementwise pass and a reduction over [B, T, H]: far below one decoder layer. NaN would otherwise
        # spread through the router to the sequence's gate and through attention to its other tokens.
        if not bool(torch.isfinite(inputs_embeds).all()):
            raise ValueError("inputs_embeds contains NaN or infinite values.")


# ----------------------------------------------------------------------------------------------------- decoder
class PMoEMLP(nn.Module):
    def __init__(self, config: PMoEConfig, with_experts: bool):
        super().__init__()
        targets = set(config.expert_target_modules) if with_experts else set()

        def linear(name, in_features, out_features):
            return PMoELinear(in_features, out_features, config.mlp_bias, config, name in targets)

        self.gate_proj = linear("gate_proj", config.hidden_size, config.intermediate_size)
        self.up_proj = linear("up_proj", config.hidden_size, config.intermediate_size)
        self.down_proj = linear("down_proj", config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, x: torch.Tensor, rank_gates: torch.Tensor | None = None, active_experts: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        experts = dict(rank_gates=rank_gates, active_experts=active_experts)
        return self.down_proj(self.act_fn(self.gate_proj(x, **experts)) * self.up_proj(x, **experts), **experts)


class PMoEAttention(nn.Module):
    """Llama attention (GQA, RoPE, optional Qwen3 q/k norm, optional sliding window) on `PMoELinear` projections."""

    def __init__(self, config: PMoEConfig, layer_idx: int, with_experts: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        targets = set(config.expert_target_modules) if with_experts else set()
        out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias

        def linear(name, in_features, out_features, bias):
            return PMoELinear(in_features, out_features, bias, config, name in targets)

        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = linear("q_proj", config.hidden_size, q_size, config.attention_bias)
        self.k_proj = linear("k_proj", config.hidden_size, kv_size, config.attention_bias)
        self.v_proj = linear("v_proj", config.hidden_size, kv_size, config.attention_bias)
        self.o_proj = linear("o_proj", q_size, config.hidden_size, out_bias)
        if config.qk_norm:
            self.q_norm = PMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = PMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        rank_gates: torch.Tensor | None = None,
        active_experts: tuple[int, ...] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        experts = dict(rank_gates=rank_gates, active_experts=active_experts)

        query_states = self.q_proj(hidden_states, **experts).view(hidden_shape)
        key_states = self.k_proj(hidden_states, **experts).view(hidden_shape)
        value_states = self.v_proj(hidden_states, **experts).view(hidden_shape).transpose(1, 2)
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output, **experts), attn_weights


class PMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.has_experts = layer_idx in config.expert_layer_indices
        self.self_attn = PMoEAttention(config, layer_idx, with_experts=self.has_experts)
        self.mlp = PMoEMLP(config, with_experts=self.has_experts)
        self.input_layernorm = PMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rank_gates: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        active_experts: tuple[int, ...] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # The gates (`expert_rank_gates` of the `active_experts`) arrive as an argument, not module state, so gradient
        # checkpointing recomputes with the same ones; positional, so that reentrant checkpointing also carries their
        # gradient back to the router.
        # The cache arrives under transformers' own name, which `GradientCheckpointingLayer` clears when checkpointing.
        cache = kwargs.pop(CACHE_KWARG, None)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            rank_gates=rank_gates,
            active_experts=active_experts,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, rank_gates, active_experts)
        return residual + hidden_states


# ----------------------------------------------------------------------------------------------------- models
class PMoEPreTrainedModel(PMoEGrowthMixin, PreTrainedModel):
    config: PMoEConfig
    config_class = PMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PMoEDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the expert count changes the graph; not tested under fullgraph compile yet
    _can_record_outputs = {
        "hidden_states": PMoEDecoderLayer,
        "attentions": PMoEAttention,
    }
    # Heads that `add_expert` leaves trainable although they are base weights (as PEFT's `modules_to_save`).
    _trainable_task_heads: tuple[str, ...] = ()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PMoELoRAExpert):
            module.reset_parameters()
        elif isinstance(module, PMoERouterKey):
            module.reset_parameters()
        elif isinstance(module, PMoERouter):
            init.zeros_(module.usage)
            module.reset_parameters()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Weights are written only as safetensors. transformers 5 dropped `safe_serialization` and swallows it in
        # **kwargs, so `safe_serialization=False` would silently give safetensors anyway: refuse it instead.
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError(
                "pmoe saves weights only as safetensors (model.safetensors): safe_serialization=False is not "
                "supported, because pickle files (pytorch_model.bin) can run code when loaded. Drop the argument."
            )
        # transformers records only the saved class in `auto_map`; list every head so any Auto class loads the
        # checkpoint as remote code.
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoConfig": "configuration_pmoe.PMoEConfig",
                "AutoModel": "modeling_pmoe.PMoEModel",
                "AutoModelForCausalLM": "modeling_pmoe.PMoEForCausalLM",
                "AutoModelForSequenceClassification": "modeling_pmoe.PMoEForSequenceClassification",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` that returns a fully loaded PMoE model or raises; never a half-loaded one.

        - Weights load only from safetensors: `use_safetensors` is forced on and pickle checkpoints
          (`pytorch_model.bin`, `*.pt`) are refused, since unpickling can run code.
        - A truncated `.safetensors` file or a corrupted header gives an `OSError` that says so. (safetensors has no
          checksum: corrupted tensor *data* cannot be detected.)
        - The weights must match `config.json`. transformers only warns about missing tensors and initialises them at
          random; here every expert and router tensor the config implies must be in the checkpoint with the config's
          shape, the checkpoint may hold no expert tensor the config does not build, and base weights may be missing
          only for a new task head (`score` of `PMoEForSequenceClassification` loaded from a causal LM checkpoint). A
          `ValueError` names the tensors, the shapes and the config's experts. `ignore_mismatched_sizes=True` keeps its
          transformers meaning for base weights (e.g. a head with another number of labels), never for experts.

        `output_loading_info=True` returns `(model, loading_info)` as in transformers.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        model, loading_info = load_from_safetensors(
            super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs
        )
        check_loaded_weights(model, loading_info, pretrained_model_name_or_path, ignore_mismatched_sizes, cls.__name__)
        return (model, loading_info) if output_loading_info else model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Trainer's resume loads checkpoints with strict=False, which would silently drop the tensors of experts this
        # model does not have: refuse instead, and say how to get the right model.
        extra = sorted({index for name in state_dict if (index := expert_index_of(name)) is not None
                        and index >= self.config.num_experts})
        if extra:
            raise ValueError(
                f"The weights hold experts {extra} but this model has {self.config.num_experts} experts "
                f"({self.config.expert_tasks}). Load the model that matches them, e.g. "
                "PMoEForCausalLM.from_pretrained(<checkpoint>), before resuming."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def resize_token_embeddings(self, *args, **kwargs):
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        if isinstance(self.get_input_embeddings(), PMoEEmbedding):
            self.get_input_embeddings().match_vocabulary()
        return embeddings

@dataclass
class PMoEModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus `routing_weights`: with sequence routing, the `[batch, num_experts]` gate of each
    sequence, which `generate` feeds back so that every decode step uses the prefill's gate."""

    routing_weights: torch.FloatTensor | None = None
    old_last_hidden_state: torch.FloatTensor | None = None


@dataclass
class PMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    routing_weights: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None


@dataclass
class PMoESequenceClassifierOutput(SequenceClassifierOutputWithPast):
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    routing_weights: torch.FloatTensor | None = None


class PMoEGateMixin:
    """Where `PMoEModel`'s gate comes from; the forward asks `_gate_before_layers` once, then `_routes_before` at each
    layer. The router's own forward has no side effects: a training forward's bookkeeping (key fitting, logs, usage)
    is `PMoERouter.training_step`, called from `_router_gates`."""

    def _gate_before_layers(
        self, inputs_embeds, routing_weights, attention_mask, routing_mask, sequence_ids, mask_kwargs, layer_kwargs,
        needs_router_logits: bool,
    ) -> tuple[torch.Tensor | None, tuple]:
        """The gate `[B, T or 1, E]` known before the first layer, and the router logits it came from, or `(None, ())`
        when the router reads a hidden state of this forward (`_routes_before`). Sequence routing only; in order:
        the gate given (`routing_weights`, or the one the cache carries from the prompt), the trained expert's gate
        when its key is fitted (training without the pre-pass), the screens' gates for the rows they are sure of
        (`router_screen_margin`, `_screened_gates`), or the router over the expert-free pre-pass (of the other rows)."""
        config = self.config
        if config.num_experts == 0 or config.routing != "sequence":
            return None, ()
        if routing_weights is not None:  # shape and values checked by check_model_inputs
            return routing_weights[:, None, :].to(inputs_embeds.dtype), ()
        if config.expert_layers != "all":
            return None, ()
        if self._key_is_fitted(needs_router_logits):
            return self._training_gate(inputs_embeds, sequence_ids), ()
        if self.screen_router is not None:
            if self.training:
                return self._training_pass_gates(inputs_embeds, attention_mask, routing_mask, sequence_ids,
                                                 mask_kwargs, layer_kwargs)
            if (not needs_router_logits and sequence_ids is None and config.router_screen_margin is not None
                    and not (isinstance(attention_mask, dict) and routing_mask is None)):  # (the pass raises for it)
                return self._screened_gates(inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs)
        boundary = self._shallow_prepass(inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs)
        gates, logits = self._router_gates(self.routers[0], boundary, routing_mask, sequence_ids)
        return gates, (logits.reshape(-1, logits.shape[-1]),)

    def _screens(self) -> list[tuple[int, PMoERouter]]:
        """`(layer, screen)`: the screens in the order a prompt meets them, each reading the input of its layer in the
        expert-free pass (0: the token embeddings; 1: the first-layer screen)."""
        screens = [(0, self.screen_router), (1, self.first_layer_screen_router)]
        return [(layer, screen) for layer, screen in screens if screen is not None]

    def _screened_gates(self, inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs):
        """Sequence gates `[B, 1, E]` from the screens (`router_screen_margin`): each row is routed by the first screen
        sure of it, and the expert-free pass runs only as far as the next screen, or the boundary router, for the rows
        no screen before was sure of (their inputs cut to those rows, so each row gets the gate it gets alone). Returns
        `(gates, router_logits)`; the router's logits only when no screen was sure of any row (the router then routed
        the whole batch, as without screens)."""
        rows = torch.arange(inputs_embeds.shape[0], device=inputs_embeds.device)  # the rows no screen is sure of yet
        inputs = (inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs)  # cut to `rows`
        hidden_states, layer, gates = inputs_embeds, 0, None
        for screen_layer, screen in self._screens():
            turned_off = screen_layer == 1 and not self.config.router_first_layer_screen  # (at once, by the config)
            if turned_off or not self._screen_is_complete(screen):
                continue
            hidden_states = self._shallow_prepass(hidden_states, *inputs[1:], start=layer, stop=screen_layer)
            layer = screen_layer
            sure, screen_gates = self._screen_decision(screen, hidden_states, inputs[2])
            unsure = (~sure).nonzero().squeeze(1)  # (the one host read of this screen's decision)
            if unsure.numel() == sure.numel():
                continue  # sure of no row
            if gates is None:
                gates = screen_gates.new_zeros(inputs_embeds.shape[0], *screen_gates.shape[1:])
            gates = gates.index_put((rows[sure],), screen_gates[sure])
            if unsure.numel() == 0:
                return gates.to(inputs_embeds.dtype), ()
            rows, hidden_states = rows[unsure], hidden_states[unsure]
            inputs = self._prepass_rows(unsure, *inputs)
        boundary = self._shallow_prepass(hidden_states, *inputs[1:], start=layer)
        boundary_gates, logits = self._router_gates(self.routers[0], boundary, inputs[2])
        if gates is None:
            return boundary_gates, (logits.reshape(-1, logits.shape[-1]),)
        return gates.index_put((rows,), boundary_gates.to(gates.dtype)).to(inputs_embeds.dtype), ()

    def _training_pass_gates(self, inputs_embeds, attention_mask, routing_mask, sequence_ids, mask_kwargs,
                             layer_kwargs):
        """A training forward whose boundary key is still open runs the expert-free pass; the screens' keys of the
        trained expert are fitted on the same sequences, from the features each screen reads in that pass."""
        read, boundary = self._pass_through_screens(inputs_embeds, attention_mask, routing_mask, mask_kwargs,
                                                    layer_kwargs)
        for screen, hidden_states in read:
            self._fit_screen_key(screen, hidden_states, routing_mask, sequence_ids)
        gates, logits = self._router_gates(self.routers[0], boundary, routing_mask, sequence_ids)
        return gates, (logits.reshape(-1, logits.shape[-1]),)

    def _pass_through_screens(self, inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs,
                              to_boundary: bool = True):
        """The expert-free pass over the whole batch, read at each screen on the way: `([(screen, the input of its
        layer)], the router's input)` (`None` for the router's input when `to_boundary=False`: the pass stops at the
        last screen)."""
        read, hidden_states, layer = [], inputs_embeds, 0
        for screen_layer, screen in self._screens():
            hidden_states = self._shallow_prepass(hidden_states, attention_mask, routing_mask, mask_kwargs,
                                                  layer_kwargs, start=layer, stop=screen_layer)
            layer = screen_layer
            read.append((screen, hidden_states))
        if not to_boundary:
            return read, None
        return read, self._shallow_prepass(hidden_states, attention_mask, routing_mask, mask_kwargs, layer_kwargs,
                                           start=layer)

    @staticmethod
    def _prepass_rows(rows, inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs) -> tuple:
        """`_shallow_prepass`'s arguments for the batch rows `rows` only: every input that has a row per sequence is
        cut to those rows (position ids and rotary embeddings shared by the batch, `[1, ...]`, stay as they are)."""
        batch_size = inputs_embeds.shape[0]

        def take(value):
            return value[rows] if isinstance(value, torch.Tensor) and value.shape[0] == batch_size else value

        embeds = inputs_embeds[rows]
        cos, sin = layer_kwargs["position_embeddings"]
        layer_kwargs = {**layer_kwargs, "position_embeddings": (take(cos), take(sin)),
                        "position_ids": take(layer_kwargs["position_ids"])}
        mask_kwargs = {**mask_kwargs, "inputs_embeds": embeds, "position_ids": take(mask_kwargs["position_ids"])}
        return embeds, take(attention_mask), take(routing_mask), mask_kwargs, layer_kwargs

    def _screen_decision(self, screen, hidden_states, routing_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sure [B] bool, gates [B, 1, E])` of one screen reading `hidden_states`: a row is sure where the screen's
        best expert scores at least `router_screen_margin` above the runner-up."""
        if routing_mask is not None and routing_mask.shape[1] != hidden_states.shape[1]:
            routing_mask = routing_mask[:, -hidden_states.shape[1] :]
        features, real = screen.features(hidden_states, routing_mask)
        logits, gates = screen(features, routing_mask)
        sure = screen_is_sure(logits[:, 0], self.config.router_screen_margin)
        return (sure if real is None else sure & real[:, 0]), gates

    @torch.compiler.disable  # eager, as `PMoERouter.lda_weights`: a cache keyed on tensor version counters
    def _screen_is_complete(self, screen: PMoERouter) -> bool:
        """Every expert's key in `screen` is fitted exactly where its boundary key is (cached on the counts'
        versions); a partly fitted screen would send every prompt to its few keys."""
        pairs = [(screen_key.count, key.count) for screen_key, key in zip(screen.experts, self.routers[0].experts)]
        version = tuple((t.data_ptr(), t._version) for pair in pairs for t in pair)
        cached = screen.__dict__.get("_complete")  # (kept on the screen: a copied model recomputes it)
        if cached is None or cached[0] != version:
            complete = bool(pairs) and all(bool((count > 0) == (key > 0)) for count, key in pairs)
            screen.__dict__["_complete"] = cached = (version, complete)
        return cached[1]

    def _fit_screen_key(self, screen, hidden_states, routing_mask, sequence_ids):
        """Fit the trained expert's key in `screen` on the features it reads (while the boundary key is open)."""
        expert = self._training_expert
        if expert is None or self.routers[0].experts[expert].is_fitted(self.config.router_fit_sequences):
            return
        with torch.no_grad():
            screen.experts[expert].accumulate(screen.real_features(hidden_states, routing_mask, sequence_ids))

    def _routes_before(self, layer_idx: int, gates: torch.Tensor | None) -> bool:
        """Whether a router reads the input of layer `layer_idx` (no gate yet at `router_input_layer`, or one router
        per deep layer); `_router_at(layer_idx)` is that router."""
        config = self.config
        if config.num_experts == 0:
            return False
        if layer_idx == config.router_input_layer and gates is None:
            return True
        return config.router_per_layer and layer_idx > config.num_shallow_layers

    def _router_at(self, layer_idx: int) -> PMoERouter:
        """The first router, or with one router per deep layer, deep layer `layer_idx`'s own (after the first)."""
        first_deep = self.config.num_shallow_layers
        return self.routers[layer_idx - first_deep if self.config.router_per_layer and layer_idx > first_deep else 0]

    def _router_gates(
        self, router: PMoERouter, hidden_states: torch.Tensor, routing_mask: torch.Tensor | None,
        sequence_ids: torch.Tensor | None = None,
    ):
        """Gates `[B, T or 1, E]` and logits from one router (training: see `PMoERouter.training_step`). Packed rows
        (`sequence_ids`) are routed sequence by sequence; each token gets its own sequence's gate."""
        if routing_mask is not None and routing_mask.shape[1] != hidden_states.shape[1]:
            routing_mask = routing_mask[:, -hidden_states.shape[1] :]  # a 2D mask over cached + current tokens
        # `real`: the features that stand for real tokens / sequences; a row of padding only (mean feature 0) must
        # not fit a Gaussian key, count as load or enter the logs.
        features, real = router.features(hidden_states, routing_mask, sequence_ids)
        logits, gates = router(features, routing_mask)
        if self.training:
            forced = self._training_expert if self.config.router_keys_are_fitted else None
            gates = router.training_step(features, real, gates, forced, self.config.router_fit_sequences)
        if sequence_ids is not None:
            gates = gates.gather(1, sequence_ids[..., None].expand(-1, -1, gates.shape[-1]))
        return gates.to(hidden_states.dtype), logits

    def _key_is_fitted(self, needs_router_logits: bool) -> bool:
        """Training an expert whose fitted key has seen `router_fit_sequences` sequences or was fitted in a pass of its
        own (`fit_router_key`, which the Trainer callback runs before a task's first step): its gate is forced, so the
        expert-free pass would only refit the key and fill the logs, and is skipped. Distillation and router-logit
        outputs still need the router's logits."""
        config, expert = self.config, self._training_expert
        return (
            self.training and expert is not None and config.router_keys_are_fitted and not needs_router_logits
            and self.routers[0].experts[expert].is_fitted(config.router_fit_sequences)
        )

    def _training_gate(self, inputs_embeds: torch.Tensor, sequence_ids: torch.Tensor | None) -> torch.Tensor:
        """The gate of `_router_gates` with the trained expert forced, `[B, 1, E]` one-hot, without routing; the expert's
        usage grows by the batch's sequences, as in `PMoERouter.training_step`."""
        expert = self._training_expert
        gates = inputs_embeds.new_zeros(inputs_embeds.shape[0], 1, self.config.num_experts)
        gates[..., expert] = 1.0
        with torch.no_grad():
            sequences = inputs_embeds.shape[0] if sequence_ids is None else (sequence_ids.amax(dim=1) + 1).sum()
            self.routers[0].usage[expert] += sequences
        return gates

    def _sequence_routing_inputs(self, position_ids, attention_mask, cache, routing_weights, batch_size: int):
        """Sequence routing: which packed sequence each token belongs to (`None`: one sequence per row) and the gate
        given or carried by the cache (`_carried_gate`). Packed rows are detected as transformers' masks detect them:
        positions given, no 2D mask, no cache."""
        if self.config.num_experts == 0 or self.config.routing != "sequence":
            return None, routing_weights
        sequence_ids = None
        if position_ids is not None and attention_mask is None and cache is None:
            sequence_ids = find_packed_sequence_indices(position_ids.expand(batch_size, -1))
        return sequence_ids, self._carried_gate(cache, routing_weights, batch_size)

    def _sequence_gates(self, gates, sequence_ids, cache) -> torch.Tensor | None:
        """Sequence routing: each sequence's gate `[B, E]`, returned for `generate` to feed back and carried by the
        cache (when one is returned) for a forward that continues from it."""
        config = self.config
        if config.num_experts == 0 or config.routing != "sequence" or gates is None or sequence_ids is not None:
            return None
        sequence_gates = gates[:, 0, :].float()
        if cache is not None:
            cache.pmoe_routing_weights = sequence_gates
        return sequence_gates

    def _carried_gate(self, cache: Cache | None, routing_weights: torch.Tensor | None, batch_size: int):
        """Sequence routing: the gate given, else the one the cache carries from the prompt that filled it.

        The gate belongs to the sequence and is computed once, from the prompt; a forward that continues from a
        cache (generate from a returned cache, assisted decoding, a manual decode loop) reuses it, so its tokens are
        those of one uninterrupted `generate`. Pass `routing_weights` to route otherwise."""
        if routing_weights is not None or cache is None:
            return routing_weights
        carried = getattr(cache, "pmoe_routing_weights", None)
        if carried is None or carried.shape != (batch_size, self.config.num_experts) or cache.get_seq_length() == 0:
            return None  # a fresh (or reset) cache: this forward is the prompt
        return carried

    def _shallow_prepass(self, hidden_states, attention_mask, routing_mask, mask_kwargs, layer_kwargs, start: int = 0,
                         stop: int | None = None):
        """`expert_layers="all"`: the hidden state leaving the shallow block in a first pass without experts, so the
        gate never depends on the experts it selects. It reads and writes no cache (only the current tokens), and it
        is not part of the model's outputs (`output_hidden_states` / `output_attentions`). `start` / `stop`: run only
        layers `start .. stop - 1` on `hidden_states`, the input of layer `start` (default: up to the router's input
        layer), so the screens can read the pass part way."""
        config = self.config
        stop = config.router_input_layer if stop is None else stop
        # `generate` passes the prompt's 2D mask as `routing_mask` when it pre-builds 4D masks (static caches).
        padding_mask = routing_mask if isinstance(attention_mask, dict) else attention_mask
        if isinstance(attention_mask, dict) and routing_mask is None:
            raise ValueError(
                "expert_layers='all' computes its gate from an expert-free shallow pass, which needs the 2D "
                "attention mask: pass it as `routing_mask` when `attention_mask` is a dict of prebuilt masks."
            )
        if stop <= start:  # no layer to run (e.g. the router reads the token embeddings)
            return hidden_states
        length = hidden_states.shape[1]
        if isinstance(padding_mask, torch.Tensor) and padding_mask.dim() == 2 and padding_mask.shape[1] != length:
            padding_mask = padding_mask[:, -length:]  # continuing from a cache: the mask also covers cached tokens
        masks = self._causal_masks({**mask_kwargs, "attention_mask": padding_mask, CACHE_KWARG: None})
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.router_keys == "learned"), outputs_not_captured():
            for layer_idx in range(start, stop):
                hidden_states = self.layers[layer_idx](
                    hidden_states, None, attention_mask=masks[config.layer_types[layer_idx]], use_cache=False,
                    **layer_kwargs,
                )
        return hidden_states

    @torch.no_grad()
    def _expert_free_routing_features(self, input_ids, attention_mask=None, labels=None, position_ids=None,
                                      routing_mask=None, to_boundary: bool = True
                                      ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The first router's features `[n, P]` of a batch's real sequences (real tokens, with token routing), read
        where it reads them at inference, without experts, and each screen's (`_screens()` order), read in the same
        pass: what fitting a key sees (`fit_router_key`). With sequence routing, token `labels` mark the prompt (-100)
        that routes, as in a training forward, and the columns after the last routing token are not run (causal
        attention: they change no routing feature). `to_boundary=False`: the screens' features only (the pass stops
        at the last screen; the router's are `None`)."""
        token_labels = labels is not None and labels.shape == input_ids.shape
        if routing_mask is None and token_labels and self.config.routing == "sequence":
            routing_mask = prompt_mask_from_labels(labels, attention_mask)
        if routing_mask is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            routing_mask = attention_mask
        sequence_ids, _ = self._sequence_routing_inputs(position_ids, attention_mask, None, None, input_ids.shape[0])
        if routing_mask is not None and sequence_ids is None and routing_mask.any():
            length = int(routing_mask.any(dim=0).nonzero().max()) + 1
            input_ids, routing_mask = input_ids[:, :length], routing_mask[:, :length]
            attention_mask = attention_mask[:, :length] if isinstance(attention_mask, torch.Tensor) else attention_mask
            position_ids = position_ids[..., :length] if position_ids is not None else None
        inputs_embeds = self.embed_tokens(input_ids)  # the base embedding: experts are added by the forward
        _, position_ids, mask_kwargs, _ = self._cache_positions_and_masks(
            inputs_embeds, attention_mask, position_ids, None, False
        )
        layer_kwargs = dict(position_embeddings=self.rotary_emb(inputs_embeds, position_ids=position_ids),
                            position_ids=position_ids)
        read, boundary = self._pass_through_screens(inputs_embeds, attention_mask, routing_mask, mask_kwargs,
                                                    layer_kwargs, to_boundary)
        screen_features = [screen.real_features(hidden, routing_mask, sequence_ids) for screen, hidden in read]
        if boundary is None:
            return None, screen_features
        return self.routers[0].real_features(boundary, routing_mask, sequence_ids), screen_features


class PMoEModel(PMoEGateMixin, PMoEPreTrainedModel):
    def __init__(self, config: PMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = PMoEEmbedding(
            config.vocab_size, config.hidden_size, self.padding_idx, config, with_experts=config.expert_embeddings
        )
        self.layers = nn.ModuleList(
            [PMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        num_routers = len(config.deep_layer_indices) if config.router_per_layer else 1
        self.routers = nn.ModuleList([PMoERouter(config) for _ in range(num_routers)])
        # The screens (`router_screen_margin`): routers on the token embeddings and on the first layer's output in the
        # expert-free pass that route a prompt alone when they are sure, so prefill skips (the rest of) the pass.
        self.screen_router = PMoERouter(config) if config.uses_router_screen else None
        self.first_layer_screen_router = PMoERouter(config) if config.uses_first_layer_screen else None
        self.norm = PMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PMoERotaryEmbedding(config=config)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.gradient_checkpointing = False
        self._training_expert = None

        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        routing_weights: torch.Tensor | None = None,
        routing_mask: torch.Tensor | None = None,
        compute_old_model: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> PMoEModelOutputWithPast:
        r"""
        cache / past_key_values (`Cache`, *optional*):
            The KV cache, under either name (transformers >= 5.24 calls it `cache`). With sequence routing it also
            carries the gate of the prompt that filled it, which a forward continuing from it reuses.
        routing_weights (`torch.FloatTensor` of shape `(batch_size, num_experts)`, *optional*):
            Sequence routing: use these gates instead of computing them (what `generate` passes at decode steps).
        routing_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Sequence routing: the tokens whose mean feature routes the sequence (the prompt). Defaults to the 2D
            attention mask, or every token. Packed rows (`position_ids` restarting, no `attention_mask`, as
            `DataCollatorWithFlattening` gives) route each packed sequence from its own tokens.
        compute_old_model (`bool`, defaults to `False`):
            Also return `old_last_hidden_state`: the same model with `training_expert` (and later experts) masked out
            of routing, computed without gradients and without a copy of the model: the layers before the first
            expert layer are shared, the expert layers run a second time (Lifelong-MoE distillation).
        """
        cache = one_cache_argument(cache, past_key_values)
        check_model_inputs(
            self.config, self.embed_tokens.num_embeddings, input_ids, inputs_embeds, attention_mask, routing_weights,
            routing_mask, has_cache=cache is not None,
        )
        config = self.config
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        sequence_ids, routing_weights = self._sequence_routing_inputs(
            position_ids, attention_mask, cache, routing_weights, inputs_embeds.shape[0]
        )
        self._check_embedding_experts_apply(input_ids, routing_weights)
        cache, position_ids, mask_kwargs, causal_masks = self._cache_positions_and_masks(
            inputs_embeds, attention_mask, position_ids, cache, use_cache
        )
        if routing_mask is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            routing_mask = attention_mask
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        layer_kwargs = dict(position_embeddings=position_embeddings, position_ids=position_ids, **kwargs)
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits

        gates, router_logits = self._gate_before_layers(
            inputs_embeds, routing_weights, attention_mask, routing_mask, sequence_ids, mask_kwargs, layer_kwargs,
            needs_router_logits=compute_old_model or output_router_logits,
        )
        active_for, (rank_gates, active_experts) = gates, self._expert_gate_inputs(gates, inputs_embeds.dtype)
        hidden_states = self._with_embedding_experts(input_ids, inputs_embeds, rank_gates, active_experts)
        first_expert_layer = config.expert_layer_indices[0]
        old_model_input = None
        for layer_idx, decoder_layer in enumerate(self.layers[: config.num_hidden_layers]):
            if compute_old_model and layer_idx == first_expert_layer:
                old_model_input = inputs_embeds if layer_idx == 0 else hidden_states  # (embedding experts: redone)
            if self._routes_before(layer_idx, gates):
                gates, logits = self._router_gates(self._router_at(layer_idx), hidden_states, routing_mask, sequence_ids)
                router_logits += (logits.reshape(-1, logits.shape[-1]),)
            if gates is not active_for:  # a router in the loop decided (token routing, per-layer routers)
                active_for = gates
                rank_gates, active_experts = self._expert_gate_inputs(gates, inputs_embeds.dtype)
            hidden_states = decoder_layer(
                hidden_states, rank_gates if decoder_layer.has_experts else None,
                attention_mask=causal_masks[config.layer_types[layer_idx]], use_cache=use_cache,
                active_experts=active_experts, **{CACHE_KWARG: cache}, **layer_kwargs,
            )
        hidden_states = self.norm(hidden_states)
        old_last_hidden_state = self._old_model_pass(
            old_model_input, router_logits, first_expert_layer, causal_masks, layer_kwargs, sequence_ids, input_ids
        ) if compute_old_model else None
        return PMoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            router_logits=router_logits if output_router_logits and config.num_experts > 0 else None,
            routing_weights=self._sequence_gates(gates, sequence_ids, cache if use_cache else None),
            old_last_hidden_state=old_last_hidden_state,
            **{CACHE_KWARG: cache if use_cache else None},
        )

    def _expert_gate_inputs(self, gates, dtype):
        """What the expert layers take (`expert_gate_inputs`: the experts that run and their rank gates), worked out
        once per gate, not in every expert module."""
        return expert_gate_inputs(gates, self.config.expert_rank, self.config.expert_scaling, dtype)

    def _cache_positions_and_masks(self, inputs_embeds, attention_mask, position_ids, cache, use_cache):
        """The cache (a new `DynamicCache` when `use_cache` and none is given), the position ids, what transformers'
        mask functions take, and one causal mask per layer type."""
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                       CACHE_KWARG: cache, "position_ids": position_ids}
        # `generate` may pass the masks already built, one per layer type (static caches, compiled generation).
        causal_masks = attention_mask if isinstance(attention_mask, dict) else self._causal_masks(mask_kwargs)
        return cache, position_ids, mask_kwargs, causal_masks

    def _check_embedding_experts_apply(self, input_ids, routing_weights):
        config = self.config
        if input_ids is None and config.expert_embeddings and config.num_experts > 0 and (
            routing_weights is None or routing_weights.any()
        ):
            raise ValueError(
                "This PMoE model has embedding experts ('embed_tokens' in config.expert_target_modules): they look up "
                "token ids, so a forward from `inputs_embeds` cannot apply them and would not compute this model. "
                "Pass `input_ids`, or convert the dense model with expert_target_modules without 'embed_tokens'."
            )

    @torch.no_grad()
    def _old_model_pass(self, hidden_states, router_logits, start, causal_masks, layer_kwargs, sequence_ids=None,
                        input_ids=None):
        """The expert layers again, with `training_expert` and every later expert masked out of routing (packed rows:
        each token takes its own sequence's old gate)."""
        config = self.config
        new_expert = self._training_expert  # (PMoEConfig refuses distillation with router_per_layer)
        if new_expert is None or not router_logits:
            old_gates = None  # no expert is new: the old model is the base model
        else:
            logits = router_logits[0].reshape(hidden_states.shape[0], -1, config.num_experts)
            masked = torch.arange(config.num_experts, device=logits.device) >= new_expert
            old_gates = route(logits.masked_fill(masked, float("-inf")), config.router_activation, config.router_top_k,
                              config.router_min_gate)
            if sequence_ids is not None:
                old_gates = old_gates.gather(1, sequence_ids[..., None].expand(-1, -1, old_gates.shape[-1]))
        old_gates, active_experts = self._expert_gate_inputs(old_gates, hidden_states.dtype)
        if start == 0 and config.expert_embeddings and old_gates is not None:
            hidden_states = self._with_embedding_experts(input_ids, hidden_states, old_gates, active_experts)
        for layer_idx in range(start, config.num_hidden_layers):
            layer = self.layers[layer_idx]
            hidden_states = layer(
                hidden_states, old_gates if layer.has_experts else None,
                attention_mask=causal_masks[config.layer_types[layer_idx]], use_cache=False,
                active_experts=active_experts, **layer_kwargs,
            )
        return self.norm(hidden_states)

    def _with_embedding_experts(self, input_ids, inputs_embeds, rank_gates, active_experts=None):
        """The token embeddings plus the gated embedding experts' update (`"embed_tokens"` in expert_target_modules)."""
        if input_ids is None:
            return inputs_embeds  # only with an all-zero gate (checked in `forward`)
        update = self.embed_tokens.expert_update_for(input_ids, None, active_experts, rank_gates)
        return inputs_embeds if update is None else inputs_embeds + update.to(inputs_embeds.dtype)

    def _causal_masks(self, mask_kwargs: dict) -> dict:
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if self.has_sliding_layers:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks


class PMoEForCausalLM(PMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PMoEConfig):
        if config.routing == "expert_choice":
            raise ValueError(
                "PMoEForCausalLM cannot use routing='expert_choice': each expert would pick its tokens from the whole "
                "sequence, so a token's output would depend on later tokens, which a causal LM must not see. Use "
                "routing='sequence' or 'token' here; expert choice is for PMoEForSequenceClassification."
            )
        super().__init__(config)
        self.model = PMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -------------------------------------------------------------- conversion from dense checkpoints
    @classmethod
    def from_dense(cls, model_or_path, num_shallow_layers: int | None = None, dense_kwargs: dict | None = None,
                   **pmoe_options):
        """Convert a dense `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`.

        `model_or_path` is a loaded model or a folder / repo id (loaded with `AutoModelForCausalLM.from_pretrained(
        model_or_path, **dense_kwargs)`). The result has no experts and the same logits as the source; its base weights
        are copies (the source is left untouched). `pmoe_options` are PMoE config fields (`expert_rank`, ...).
        """
        from transformers import AutoModelForCausalLM

        if isinstance(model_or_path, (str, os.PathLike)):
            dense = AutoModelForCausalLM.from_pretrained(model_or_path, **(dense_kwargs or {}))
        elif isinstance(model_or_path, PreTrainedModel):
            dense = model_or_path
        else:
            raise TypeError(
                f"from_dense takes a PreTrainedModel or a path / repo id, got {type(model_or_path).__name__}."
            )
        if num_shallow_layers is not None:
            pmoe_options["num_shallow_layers"] = num_shallow_layers
        config = PMoEConfig.from_dense_config(dense.config, **pmoe_options)
        expected_class = SUPPORTED_DENSE_ARCHITECTURES[dense.config.model_type]
        if type(dense).__name__ != expected_class:
            raise ValueError(
                f"from_dense expects a causal LM ({expected_class}), got {type(dense).__name__}."
            )
        model = cls._from_config(
            config, dtype=dense.dtype, attn_implementation=dense.config._attn_implementation
        )
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        # PMoE-only tensors: the routers (usage counts, the LDA projection), built as a fresh model has them.
        missing = [name for name in missing if not ROUTER_MODULE_NAMES & set(name.split("."))]
        if missing or unexpected:
            raise ValueError(
                f"Converting {type(dense).__name__} to PMoE: weights do not line up (missing {missing}, "
                f"unexpected {unexpected})."
            )
        model.config.dense_model_type = dense.config.model_type
        model.config.base_model_name_or_path = (
            str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else dense.config._name_or_path or None
        )
        model.to(dense.device)
        if getattr(dense, "generation_config", None) is not None and hasattr(model, "generation_config"):
            model.generation_config = copy.deepcopy(dense.generation_config)
        return model

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        routing_weights: torch.Tensor | None = None,
        routing_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> PMoECausalLMOutputWithPast:
        r"""
        cache / past_key_values (`Cache`, *optional*):
            The KV cache, under either name (transformers >= 5.24 calls it `cache`, earlier releases
            `past_key_values`). With sequence routing it carries the prompt's gate too: a forward or `generate` that
            continues from it routes as the prompt did.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Language modeling labels; `-100` is ignored.
        output_router_logits (`bool`, *optional*):
            Return the router logits (one `[batch * seq, num_experts]` tensor per router) and, when
            `config.router_aux_loss_coef > 0`, add the load-balancing loss to `loss`.
        routing_weights (`torch.FloatTensor` of shape `(batch_size, num_experts)`, *optional*):
            Sequence routing: gates to use instead of computing them; `generate` passes the prefill's gates.
        routing_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Sequence routing: the prompt tokens whose mean feature routes each sequence. With `labels` it defaults to
            the attended tokens whose label is -100 (every attended token for a row that has none).

        Example:

        ```python
        >>> import pmoe
        >>> from transformers import AutoModelForCausalLM
        >>> model = pmoe.PMoEForCausalLM.from_dense("path/to/llama", num_shallow_layers=16)
        >>> model.add_expert("sql")  # new, trainable expert; everything else frozen
        ```
        """
        config = self.config
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        cache = one_cache_argument(cache, past_key_values)
        if routing_mask is None and labels is not None and config.routing == "sequence":
            check_labels(labels, input_ids if input_ids is not None else inputs_embeds)
            check_attention_mask(attention_mask, labels.shape[0], labels.shape[1], has_cache=cache is not None)
            routing_mask = prompt_mask_from_labels(labels, attention_mask)
        distill = self.training and labels is not None and config.distillation_alpha > 0
        outputs: PMoEModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits,
            routing_weights=routing_weights, routing_mask=routing_mask, compute_old_model=distill, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        distillation_loss = None
        if distill:
            # Lifelong-MoE: alpha * KL(old || new) on the positions the LM loss trains.
            with torch.no_grad():
                old_logits = self.lm_head(outputs.old_last_hidden_state[:, slice_indices, :])
            distillation_loss = old_model_kl(logits, old_logits, labels)
            loss = loss + config.distillation_alpha * distillation_loss

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = router_load_balancing_loss(config, outputs.router_logits, attention_mask)
            if aux_loss is not None and labels is not None and config.router_aux_loss_coef > 0:
                loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.device)

        return PMoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            routing_weights=outputs.routing_weights,
            distillation_loss=distillation_loss,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )

    def generate(self, inputs=None, *args, **kwargs):
        # An empty prompt fails inside transformers' `generate` (an IndexError) before the model runs: say why first.
        for name, prompt in (("input_ids", inputs), ("input_ids", kwargs.get("input_ids")),
                             ("inputs_embeds", kwargs.get("inputs_embeds"))):
            if isinstance(prompt, torch.Tensor):
                check_not_empty(prompt, name)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # `inputs_embeds` is named so that `generate` knows it may start from embeddings; the cache arrives in
        # **kwargs under the installed transformers' name and goes on to it unchanged.
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        # Sequence routing at prefill: keep the prompt's 2D mask for the router, since `generate` replaces
        # `attention_mask` with prebuilt 4D masks for static caches (which would route padding too). Without a 2D
        # mask there is no padding: every token routes.
        if (
            self.config.routing == "sequence"
            and kwargs.get("routing_weights") is None
            and kwargs.get("routing_mask") is None
            and isinstance(model_inputs.get("attention_mask"), dict)
        ):
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                model_inputs["routing_mask"] = attention_mask
            elif attention_mask is None:
                given = model_inputs.get("input_ids")
                given = model_inputs.get("inputs_embeds") if given is None else given
                model_inputs["routing_mask"] = torch.ones(given.shape[:2], dtype=torch.long, device=given.device)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # Sequence routing: the gate is the prefill's, at every decode step, with or without a cache.
        if getattr(outputs, "routing_weights", None) is not None:
            model_kwargs["routing_weights"] = outputs.routing_weights
        return model_kwargs


class PMoEForSequenceClassification(PMoEPreTrainedModel):
    """PMoE with a classification head on the last non-padding token (as `LlamaForSequenceClassification`).

    Every routing mode works; `routing="expert_choice"` (pMoE's prioritized routing) is only available here.
    `add_expert` leaves the head (`score`) trainable, as PEFT does for sequence classification: a new head has to
    learn. The head is shared by all tasks, so training it moves earlier tasks' scores; freeze it
    (`model.score.requires_grad_(False)`) when earlier tasks must stay bit-identical.
    """

    _trainable_task_heads = ("score",)

    def __init__(self, config: PMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PMoEModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        routing_weights: torch.Tensor | None = None,
        routing_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> PMoESequenceClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (cross-entropy), or floats when `config.num_labels == 1` (regression) or
            `config.problem_type == "multi_label_classification"`.
        routing_weights / routing_mask: as in `PMoEForCausalLM.forward` (sequence routing). For token and
            expert-choice routing, padding is read from the 2D `attention_mask` and never routed.
        """
        outputs: PMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_router_logits=output_router_logits,
            routing_weights=routing_weights,
            routing_mask=routing_mask,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            # Rightmost attended token: works for left and right padding.
            positions = torch.arange(attention_mask.shape[-1], device=logits.device)
            last_token = (positions * attention_mask.to(logits.device).bool()).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            positions = torch.arange(input_ids.shape[-1], device=logits.device)
            last_token = (positions * (input_ids != self.config.pad_token_id).to(logits.device)).argmax(-1)
        elif batch_size == 1:
            last_token = torch.tensor([logits.shape[1] - 1], device=logits.device)
        else:
            raise ValueError(
                "Cannot find each sequence's last token in a batch of several: pass a 2D attention_mask, or input_ids "
                "with config.pad_token_id set."
            )
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return PMoESequenceClassifierOutput(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            routing_weights=outputs.routing_weights,
        )


def old_model_kl(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over trained positions (shifted labels != -100) of KL(p_old || p_new) over the vocabulary."""
    trained = labels[:, 1:] != -100
    new_log_probs = F.log_softmax(logits[:, :-1][trained].float(), dim=-1)
    old_log_probs = F.log_softmax(old_logits[:, :-1][trained].float(), dim=-1)
    if new_log_probs.shape[0] == 0:
        return logits.sum() * 0.0
    return F.kl_div(new_log_probs, old_log_probs, log_target=True, reduction="batchmean")


def router_load_balancing_loss(config: PMoEConfig, router_logits: tuple, attention_mask) -> torch.Tensor | None:
    """Mixtral's load-balancing loss over the routers' logits (padding left out with token routing), or `None` with
    fitted keys: load balancing trains router keys, and Gaussian / LDA keys are fitted, not trained."""
    if config.router_keys != "learned":
        return None
    token_mask = attention_mask if config.routing != "sequence" and isinstance(attention_mask, torch.Tensor) else None
    return load_balancing_loss_func(
        router_logits, config.num_experts, max(1, config.effective_top_k),
        token_mask if token_mask is not None and token_mask.dim() == 2 else None,
    )


def prompt_mask_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The prompt of each training sequence: attended tokens whose label is -100 (all attended tokens if none is)."""
    attended = torch.ones_like(labels, dtype=torch.bool)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attended = attention_mask.bool()
    prompt = attended & (labels == -100)
    has_prompt = prompt.any(dim=-1, keepdim=True)
    return torch.where(has_prompt, prompt, attended)


__all__ = [
    "PMoECausalLMOutputWithPast",
    "PMoEModelOutputWithPast",
    "PMoEPreTrainedModel", "PMoEModel", "PMoEForCausalLM", "PMoELinear", "PMoEEmbedding", "PMoERouter", "PMoERouterKey",
    "PMoELoRAExpert", "PMoEEmbeddingExpert"]
