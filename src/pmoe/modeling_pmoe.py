# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""PyTorch PMoE: a Llama-family decoder with progressive LoRA experts in its deep layers.

Layout (see PMoEConfig): layers [0, S) are the shallow block, base weights only. Layers [S, L) are the deep block:
every targeted projection is a `PMoELinear` that carries one LoRA expert per task. A router at the boundary reads the
hidden state leaving the shallow block and gives per-token gates that every deep layer uses (or one router per deep
layer). Weight names follow transformers' Llama layout, so Llama / Mistral / Qwen2 / Qwen3 checkpoints convert by
copying, and expert weights sit at `...q_proj.experts.{e}.lora_A` / `.lora_B`, one tensor per expert.

This file is shipped inside every checkpoint as remote code: it imports only torch, transformers and
`configuration_pmoe`.
"""

import contextlib
import copy
import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from collections.abc import Callable, Iterable

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


# ----------------------------------------------------------------------------------------------------- experts
class PMoELoRAExpert(nn.Module):
    """One LoRA expert of one linear: `delta(x) = (x @ lora_A.T) @ lora_B.T`, one tensor each so freezing is per tensor."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self):
        # PEFT's LoRA init: A like nn.Linear (Kaiming uniform), B zero, so a new expert changes nothing.
        init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        init.zeros_(self.lora_B)


class PMoEEmbeddingExpert(PMoELoRAExpert):
    """One LoRA expert of the token embedding: `delta(ids) = lora_A[:, ids].T @ lora_B.T` (`A [r, vocab]`, `B [hidden,
    r]`, PEFT's `lora_embedding_A` / `lora_embedding_B`)."""

    def reset_parameters(self):
        # PEFT's init for embeddings: A zero (a new expert changes nothing), B normal. A Kaiming-uniform A over the
        # vocabulary would be ~1/sqrt(vocab) small and starve B's gradient.
        init.zeros_(self.lora_A)
        init.normal_(self.lora_B)


class PMoEExperts:
    """The progressive LoRA experts of one base module (mixed into `PMoELinear` and `PMoEEmbedding`).

    The experts' A and B matrices are concatenated so that all experts cost one matmul pair, whatever their number:
    `update = scaling * B_cat @ (gates_per_rank * (A_cat x))`. Without gates there is no update: experts are never
    applied ungated."""

    expert_class = PMoELoRAExpert

    def _init_experts(self, config: PMoEConfig, with_experts: bool, in_features: int, out_features: int):
        self.with_experts = with_experts
        self.rank = config.expert_rank
        self.scaling = config.expert_scaling
        self.expert_shape = (in_features, out_features)  # (in, out) of one expert: what its LoRA A / B map
        self.experts = nn.ModuleList()
        if with_experts:
            for _ in range(config.num_experts):
                self.experts.append(self.expert_class(in_features, out_features, self.rank))

    def add_expert(self) -> PMoELoRAExpert:
        expert = self.expert_class(*self.expert_shape, self.rank)
        expert.to(device=self.weight.device, dtype=self.weight.dtype)
        self.experts.append(expert)
        return expert

    def expert_update(
        self, project_a: Callable, expert_gates: torch.Tensor | None, active_experts: tuple[int, ...] | None
    ) -> torch.Tensor | None:
        """The gated sum of the experts' updates, or `None` when no expert applies. `project_a(A_cat)` maps the input
        through the concatenated A (`[..., E * r]`). `active_experts`: the experts that run (`None`: all of them), so
        top-k and sequence routing cost what the chosen experts cost, not all experts. `expert_gates[..., j]` is the
        gate of `active_experts[j]`; gates over all experts are also accepted and the active ones taken here (the model
        takes them once per forward, not once per module)."""
        num_experts = len(self.experts)
        if expert_gates is None or num_experts == 0 or active_experts == ():
            return None
        width = expert_gates.shape[-1]
        if active_experts is not None and width == num_experts and len(active_experts) < num_experts:
            expert_gates = expert_gates[..., list(active_experts)]
        elif width != (num_experts if active_experts is None else len(active_experts)):
            raise ValueError(
                f"{type(self).__name__} got gates for {width} experts but has {num_experts} experts"
                + ("." if active_experts is None else f" and {len(active_experts)} active ones {active_experts}.")
            )
        lora_a, lora_b = self._concatenated(active_experts)
        hidden = project_a(lora_a)  # [..., E * r]
        # Each expert's gate over its r columns, by broadcasting on an [E, r] view (no repeated gate tensor).
        gates = (expert_gates.to(hidden.dtype) * self.scaling).unsqueeze(-1)
        return F.linear((hidden.unflatten(-1, (expert_gates.shape[-1], self.rank)) * gates).flatten(-2), lora_b)

    def _concatenated(self, active_experts: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`A_cat [E*r, in]` and `B_cat [out, E*r]` of the active experts (`None`: all). Without autograd (inference)
        the concatenation is cached until one of the tensors changes (tensor version counters), so decoding does not
        copy the experts at every token."""
        experts = self.experts if active_experts is None else [self.experts[i] for i in active_experts]
        if len(experts) == 1:
            return experts[0].lora_A, experts[0].lora_B
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # (compiled: the graph holds the concatenation)
            return (torch.cat([e.lora_A for e in experts], dim=0), torch.cat([e.lora_B for e in experts], dim=1))
        key = tuple((id(t), t._version, t.device, t.dtype) for e in experts for t in (e.lora_A, e.lora_B))
        cached = self.__dict__.get("_concat_cache")
        if cached is None or cached[0] != key:
            cached = (key, torch.cat([e.lora_A for e in experts], dim=0), torch.cat([e.lora_B for e in experts], dim=1))
            self.__dict__["_concat_cache"] = cached
        return cached[1], cached[2]


class PMoELinear(PMoEExperts, nn.Linear):
    """`nn.Linear` plus progressive LoRA experts mixed by per-token gates:
    `y = W x + b + scaling * B_cat @ (gates_per_rank * (A_cat @ dropout(x)))`.

    The base weight keeps `nn.Linear`'s names (`weight`, `bias`) so dense checkpoints load unchanged. Without gates
    (`expert_gates=None`) the layer is the base linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, config: PMoEConfig, with_experts: bool):
        super().__init__(in_features, out_features, bias=bias)
        self._init_experts(config, with_experts, in_features, out_features)
        self.expert_dropout = nn.Dropout(config.expert_dropout) if config.expert_dropout > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, expert_gates: torch.Tensor | None = None, active_experts: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = self.expert_update(lambda lora_a: F.linear(self.expert_dropout(x), lora_a), expert_gates,
                                    active_experts)
        return out if update is None else out + update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={len(self.experts)}, rank={self.rank}"


class PMoEEmbedding(PMoEExperts, nn.Embedding):
    """`nn.Embedding` plus progressive LoRA experts (`expert_target_modules` with `"embed_tokens"`). Called with ids
    only it is the base embedding, which the expert-free pass and `get_input_embeddings()` users see; the model adds
    `expert_update_for(ids, gates)` once the gate is known."""

    expert_class = PMoEEmbeddingExpert

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, config: PMoEConfig,
                 with_experts: bool):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self._init_experts(config, with_experts, num_embeddings, embedding_dim)

    def expert_update_for(
        self, input_ids: torch.Tensor, expert_gates: torch.Tensor | None, active_experts: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        return self.expert_update(lambda lora_a: F.embedding(input_ids, lora_a.T, self.padding_idx), expert_gates,
                                  active_experts)

    @torch.no_grad()
    def match_vocabulary(self):
        """After `resize_token_embeddings`: give every expert's A one column per token again. Kept tokens keep their
        columns; new tokens get zero columns (no update until trained), so outputs on the old tokens are unchanged."""
        vocab = self.num_embeddings
        self.expert_shape = (vocab, self.embedding_dim)
        for expert in self.experts:
            old = expert.lora_A
            if old.shape[1] == vocab:
                continue
            new = old.new_zeros(old.shape[0], vocab)
            keep = min(vocab, old.shape[1])
            new[:, :keep] = old[:, :keep]
            expert.lora_A = nn.Parameter(new, requires_grad=old.requires_grad)
        self.__dict__.pop("_concat_cache", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={len(self.experts)}, rank={self.rank}"


# The statistics a fitted router key keeps, by kind (buffers saved with the model; no raw data).
KEY_STATISTICS = {
    "gaussian": ("count", "feature_sum", "feature_sq_sum"),  # float32: a diagonal Gaussian
    "lda": ("count", "feature_sum", "feature_outer_sum"),  # float64: one Gaussian per task, covariance shared
}


def keep_dtypes(module: nn.Module, names: Iterable[str], apply: Callable):
    """Run `module._apply` (`.to(dtype)`, `.half()`, ...) without changing the dtype of the buffers `names`: router
    statistics are sums and counts, never rounded to bf16 (devices still move)."""
    before = {name: module._buffers[name] for name in names if module._buffers.get(name) is not None}
    result = apply()
    for name, old in before.items():
        new = module._buffers[name]
        if new is not None and new.dtype != old.dtype:
            module._buffers[name] = old.to(device=new.device, dtype=old.dtype)
    return result


class PMoERouterKey(nn.Module):
    """One expert's entry in a router.

    Learned keys: a key vector and a bias (parameters, zero at growth). Gaussian keys: the running count, sum and sum
    of squares of the routing features seen while the expert was trained (float32 buffers, saved with the model); the
    key is the diagonal Gaussian they define, and scores `-inf` until it has seen a feature. LDA keys: the count, sum
    and sum of outer products of the (projected) routing features, in float64; the router pools them into one shared
    covariance (see `PMoERouter.lda_weights`).
    """

    def __init__(self, config: PMoEConfig):
        super().__init__()
        self.kind = config.router_keys
        size = config.router_feature_size
        if self.kind == "learned":
            self.key = nn.Parameter(torch.empty(size))
            self.bias = nn.Parameter(torch.empty(()))
        elif self.kind == "gaussian":
            self.register_buffer("count", torch.zeros((), dtype=torch.float32))
            self.register_buffer("feature_sum", torch.zeros(size, dtype=torch.float32))
            self.register_buffer("feature_sq_sum", torch.zeros(size, dtype=torch.float32))
        else:
            self.register_buffer("count", torch.zeros((), dtype=torch.float64))
            self.register_buffer("feature_sum", torch.zeros(size, dtype=torch.float64))
            self.register_buffer("feature_outer_sum", torch.zeros(size, size, dtype=torch.float64))
        self.reset_parameters()

    @property
    def statistics(self) -> tuple[str, ...]:
        return KEY_STATISTICS.get(self.kind, ())

    def reset_parameters(self):
        if self.kind == "learned":
            init.zeros_(self.key)
            init.zeros_(self.bias)
        else:
            for name in self.statistics:
                init.zeros_(getattr(self, name))

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not round the statistics: they keep their dtype (devices still move).
        return keep_dtypes(self, self.statistics, lambda: super(PMoERouterKey, self)._apply(fn, recurse))

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor):
        """Add routing features `[n, size]` to a fitted key's statistics."""
        features = features.to(self.feature_sum.dtype)
        self.count += features.shape[0]
        self.feature_sum += features.sum(0)
        if self.kind == "gaussian":
            self.feature_sq_sum += features.square().sum(0)
        else:
            self.feature_outer_sum += features.T @ features

    def has_seen(self, sequences: int | None) -> bool:
        """Whether a fitted key's count has reached `sequences` (`None`: never). The answer is cached until the count
        changes (tensor version counter), so once a key is fitted enough, asking costs no device-to-host read."""
        if sequences is None or self.kind == "learned":
            return False
        version = (self.count._version, self.count.data_ptr())
        cached = self.__dict__.get("_has_seen")
        if cached is None or cached[:2] != (version, sequences):
            cached = (version, sequences, bool(self.count >= sequences))
            self.__dict__["_has_seen"] = cached
        return cached[2]

    def gaussian(self, variance_floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(mean, variance, fitted)` of a Gaussian key."""
        count = self.count.clamp_min(1.0)
        mean = self.feature_sum / count
        variance = (self.feature_sq_sum / count - mean.square()).clamp_min(0.0) + variance_floor
        return mean, variance, self.count > 0


class PMoERouter(nn.Module):
    """Scores every expert from routing features and turns the scores into gates.

    Features are the RMS-normalised hidden states (token routing, `[B, T, H]`) or their mean over the routing mask
    (sequence routing, `[B, 1, H]`). Learned keys score `features @ key + bias`; Gaussian keys score the diagonal
    Gaussian log-likelihood of the features. Scores are divided by the temperature, then sigmoid or softmax, with
    optional top-k. Each expert has its own `PMoERouterKey` (`routers.{i}.experts.{e}`), so earlier experts' router
    entries freeze on their own.

    While training, the router also keeps a small window of statistics for the logs (see `pop_log_stats`).
    """

    def __init__(self, config: PMoEConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.experts = nn.ModuleList([PMoERouterKey(config) for _ in range(config.num_experts)])
        # How much gate mass each expert received in training forwards (saved; expert merging picks by it).
        self.register_buffer("usage", torch.zeros(config.num_experts, dtype=torch.float32))
        # LDA keys: a fixed random projection of the routing feature, so a key's statistics are `P x P` whatever the
        # hidden size (saved with the router: the keys are only meaningful with the projection they were fitted in).
        projection = None
        if config.router_keys == "lda" and config.router_feature_size < config.hidden_size:
            projection = torch.empty(config.router_feature_size, config.hidden_size)
        self.register_buffer("projection", projection)
        self.reset_parameters()
        self._log_stats = None

    def reset_parameters(self):
        if self.projection is not None:
            # A fixed seed: every fresh router projects alike (Johnson-Lindenstrauss scaling keeps distances).
            generator = torch.Generator().manual_seed(0)
            values = torch.randn(self.projection.shape, generator=generator) / math.sqrt(self.projection.shape[0])
            init.copy_(self.projection, values.to(device=self.projection.device, dtype=self.projection.dtype))

    def _apply(self, fn, recurse=True):
        # Counts and the projection stay float32 in bf16 models.
        return keep_dtypes(self, ("usage", "projection"), lambda: super(PMoERouter, self)._apply(fn, recurse))

    def add_key(self, device: torch.device, dtype: torch.dtype) -> PMoERouterKey:
        entry = PMoERouterKey(self.config).to(device=device, dtype=dtype)
        self.experts.append(entry)
        self.usage = torch.cat([self.usage, self.usage.new_zeros(1)])
        if self._log_stats is not None:  # keep the log window: the new expert has had no load yet
            self._log_stats["load"] = torch.cat([self._log_stats["load"], self._log_stats["load"].new_zeros(1)])
        return entry

    def features(
        self, hidden_states: torch.Tensor, routing_mask: torch.Tensor | None, sequence_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Routing features `[B, G, H]` and which of them are real (`[B, G]` bool; `None`: all).

        Token routing: one per token (G = T; padding is not real). Sequence routing: the mean over the routing mask,
        one per row (G = 1), or one per packed sequence when `sequence_ids` (`[B, T]`, as transformers'
        `find_packed_sequence_indices`) says a row holds several (G = sequences in the fullest row); a row with no
        routing token is not real (its feature is 0), nor are the missing sequences of rows that hold fewer.
        """
        # Routing in float32, so gates stay stable in bf16 runs too.
        features = F.rms_norm(hidden_states.float(), (self.hidden_size,), eps=self.eps)
        if self.projection is not None:  # linear, so projecting before the mean is projecting the mean
            features = features @ self.projection.T.float()
        if self.config.routing != "sequence":
            return features, None if routing_mask is None else routing_mask.bool()
        if sequence_ids is not None:
            membership = F.one_hot(sequence_ids, int(sequence_ids.max()) + 1).to(features.dtype)  # [B, T, G]
            if routing_mask is not None:
                # A packed sequence without routing tokens (no prompt label) routes from all its tokens, as a row does.
                routed = membership * routing_mask.to(features.dtype)[..., None]
                membership = torch.where(routed.sum(dim=1, keepdim=True) > 0, routed, membership)
            counts = membership.sum(dim=1)  # [B, G]
            pooled = membership.transpose(1, 2) @ features / counts.clamp_min(1.0)[..., None]
            return pooled, counts > 0
        if routing_mask is None:
            return features.mean(dim=1, keepdim=True), None
        weights = routing_mask.to(features.dtype).unsqueeze(-1)
        pooled = (features * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        return pooled, routing_mask.bool().any(dim=1, keepdim=True)

    # Eager under torch.compile: the cache is keyed on tensor version counters, which dynamo would turn into
    # data-dependent guards (several graph breaks and a recompute per call); eager, it is one call and a cache hit.
    @torch.compiler.disable
    def lda_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per expert `(w, b, fitted)` of the linear discriminant: `score = feature @ w + b` is the log-likelihood of
        the expert's Gaussian with the shared covariance, up to a term all experts share.

        The covariance pools every fitted expert's within-task scatter, `sum_e (S_e - s_e s_e^T / n_e)`, over
        `N - E` degrees of freedom, shrunk towards `trace / P * I` (`router_shrinkage`) plus `router_variance_floor`:
        exactly what an LDA fitted on all tasks' features at once gives. Unfitted experts add exact zeros, so growing a
        key changes no old score. Cached (float64) until a statistic changes."""
        tensors = [getattr(entry, name) for entry in self.experts for name in entry.statistics]
        key = tuple((id(t), t._version, t.device) for t in tensors)
        cached = self.__dict__.get("_lda_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        size = self.config.router_feature_size
        reference = self.experts[0].feature_sum
        scatter = torch.zeros(size, size, dtype=torch.float64, device=reference.device)
        total, fitted_experts = reference.new_zeros(()), reference.new_zeros(())
        for entry in self.experts:  # in index order, one by one: rounding does not depend on the expert count
            count = entry.count.clamp_min(1.0)
            scatter = scatter + (entry.feature_outer_sum - torch.outer(entry.feature_sum, entry.feature_sum) / count)
            total = total + entry.count
            fitted_experts = fitted_experts + (entry.count > 0).to(total.dtype)
        covariance = scatter / (total - fitted_experts).clamp_min(1.0)
        shrinkage = self.config.router_shrinkage
        diagonal = shrinkage * covariance.diagonal().mean() + self.config.router_variance_floor
        covariance = (1 - shrinkage) * covariance + diagonal * torch.eye(size, dtype=covariance.dtype,
                                                                         device=covariance.device)
        precision = torch.linalg.inv(covariance)
        weights = []
        for entry in self.experts:
            mean = entry.feature_sum / entry.count.clamp_min(1.0)
            w = precision @ mean
            weights.append((w, -0.5 * (mean @ w), entry.count > 0))
        self.__dict__["_lda_cache"] = (key, weights)
        return weights

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.router_keys == "learned":
            keys = torch.stack([entry.key for entry in self.experts]).float()
            biases = torch.stack([entry.bias for entry in self.experts]).float()
            scores = features @ keys.T + biases
        elif self.config.router_keys == "lda":
            features64 = features.double()  # one matrix-vector product per expert, as for the Gaussian keys
            per_expert = [(features64 @ w + b).masked_fill(~fitted, float("-inf")) for w, b, fitted in self.lda_weights()]
            scores = torch.stack(per_expert, dim=-1).float()
        else:
            # sum_d (f - mu)^2 / var, expanded into matrix-vector products so no [B, T, E, H] tensor is built; one per
            # expert, not one matmul over all keys: a matmul's rounding depends on how many keys it spans, so growing
            # a key would move the old experts' scores by float32 rounding, and growth would no longer be bit-exact.
            squares = features.square()
            constant = self.hidden_size * math.log(2 * math.pi)
            per_expert = []
            for entry in self.experts:
                mean, variance, fitted = entry.gaussian(self.config.router_variance_floor)
                precision = variance.reciprocal()
                distance = squares @ precision - 2 * (features @ (mean * precision)) + (mean.square() * precision).sum()
                score = -0.5 * (distance + variance.log().sum() + constant)
                per_expert.append(score.masked_fill(~fitted, float("-inf")))
            scores = torch.stack(per_expert, dim=-1)
        return scores / self.config.router_temperature

    def forward(
        self, features: torch.Tensor, routing_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(logits, gates)`, both `[batch, seq or 1, num_experts]`, float32."""
        config = self.config
        logits = self.logits(features)
        if config.routing == "expert_choice":
            return logits, expert_choice_route(logits, config.router_activation, config.expert_capacity, routing_mask)
        return logits, route(logits, config.router_activation, config.router_top_k, config.router_min_gate)

    @torch.no_grad()
    def record(self, gates: torch.Tensor, rows: torch.Tensor | None = None, forced_expert: int | None = None):
        """Add a training batch's router gates (`[..., E]`, the router's own decision) to the log window."""
        gates = gates.reshape(-1, gates.shape[-1]).float()
        if rows is not None:
            gates = gates[rows.reshape(-1)]
        if self._log_stats is None or self._log_stats["load"].shape[0] != gates.shape[-1]:
            zeros = gates.new_zeros(())
            self._log_stats = {"load": gates.new_zeros(gates.shape[-1]), "entropy": zeros, "rows": zeros.clone(),
                               "agree": zeros.clone(), "forced_rows": zeros.clone()}
        stats = self._log_stats
        probabilities = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
        stats["load"] += probabilities.sum(0)
        stats["entropy"] -= (probabilities * probabilities.clamp_min(1e-9).log()).sum()
        stats["rows"] += gates.shape[0]
        if forced_expert is not None:
            stats["agree"] += ((gates.argmax(-1) == forced_expert) & (gates.sum(-1) > 0)).sum()
            stats["forced_rows"] += gates.shape[0]

    def pop_log_stats(self) -> dict[str, float] | None:
        """The window's mean per-expert load, mean gate entropy (nats) and, while an expert's routing is forced, how
        often the router itself would have picked it; the window is then emptied."""
        stats, self._log_stats = self._log_stats, None
        if stats is None or stats["rows"] == 0:
            return None
        rows = stats["rows"].item()
        result = {"load": (stats["load"] / rows).tolist(), "entropy": stats["entropy"].item() / rows}
        if stats["forced_rows"] > 0:
            result["agreement"] = (stats["agree"] / stats["forced_rows"]).item()
        return result


def active_expert_indices(gates: torch.Tensor | None) -> tuple[int, ...] | None:
    """The experts with a non-zero gate anywhere in `gates` (`None` when all are: no selection needed).
    One small device-to-host read per routing decision, not per layer."""
    if gates is None:
        return None
    used = gates.detach().reshape(-1, gates.shape[-1]).ne(0).any(dim=0).tolist()  # the one host read
    if all(used):
        return None
    return tuple(index for index, is_used in enumerate(used) if is_used)


def gates_of_active_experts(gates: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """`gates` `[..., E]` narrowed to the experts that run, and their indices (`None`: all run, `gates` unchanged):
    what the expert layers take, worked out once per routing decision instead of once per module."""
    active = active_expert_indices(gates)
    return (gates if active is None else gates[..., list(active)]), active


def route(logits: torch.Tensor, activation: str, top_k: int | None, min_gate: float = 0.0) -> torch.Tensor:
    """Turn router logits `[..., E]` into gates: sigmoid or softmax, keeping the `top_k` best experts if set, and
    (softmax) only the experts whose gate is at least `min_gate` times the row's largest, renormalised over them.

    Experts scored `-inf` (unfitted Gaussian keys) get gate 0; a row where every expert is `-inf` gets all zeros.
    """
    num_experts = logits.shape[-1]
    if top_k and top_k < num_experts:
        selected = logits.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, selected, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if activation == "softmax" and min_gate > 0:
        # gate_e / max gate = exp(logit_e - max logit): the floor is a logit threshold, and dropped experts become
        # -inf, so the kept gates are exactly the softmax over the kept experts.
        floor = logits.detach().amax(dim=-1, keepdim=True) + math.log(min_gate)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if activation == "softmax":
        # Renormalised over the kept experts (Mixtral-style); all -inf rows give NaN, which means "no expert".
        # Written out, not torch.softmax: its reduction changes summation order with the row length (seen on CPU
        # from 15 to 16 experts), so a new expert scored -inf would move the old gates by rounding. Here the experts
        # are added one by one in index order, and a -inf expert adds an exact 0. (The shift by the row's maximum
        # leaves the softmax unchanged, so it carries no gradient.)
        if num_experts == 0:
            return logits
        exps = torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))
        total = exps[..., 0]
        for index in range(1, num_experts):
            total = total + exps[..., index]
        return (exps / total.unsqueeze(-1)).nan_to_num(0.0)
    return torch.sigmoid(logits)


def expert_choice_route(
    logits: torch.Tensor, activation: str, capacity: int | float | None, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """pMoE's prioritized routing: every expert keeps its `capacity` best tokens of each sequence.

    `logits` is `[B, T, E]`; each token's scores become probabilities over the experts (the activation), then every
    expert ranks the sequence's non-padding tokens by its probability and keeps the top ones (ties: the earlier token).
    A kept token's gate is its probability; every other gate is 0. Padding (`token_mask == 0`) is never kept.
    """
    batch, length, num_experts = logits.shape
    probabilities = route(logits, activation, None)
    valid = torch.ones(batch, length, dtype=torch.bool, device=logits.device) if token_mask is None else (
        token_mask.to(logits.device).bool()
    )
    num_valid = valid.sum(dim=1)
    if capacity is None:
        per_sequence = torch.div(num_valid + num_experts - 1, num_experts, rounding_mode="floor")
    elif isinstance(capacity, float):
        per_sequence = torch.ceil(num_valid * capacity).long()
    else:
        per_sequence = torch.full_like(num_valid, capacity)
    per_sequence = torch.minimum(per_sequence, num_valid)
    scores = probabilities.detach().masked_fill(~valid[..., None], float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(length, device=order.device).view(1, -1, 1).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank of each token in each expert's ordering
    keep = (rank < per_sequence[:, None, None]) & valid[..., None]
    return probabilities * keep


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
        self, x: torch.Tensor, expert_gates: torch.Tensor | None = None, active_experts: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        hidden = self.act_fn(self.gate_proj(x, expert_gates, active_experts)) * self.up_proj(
            x, expert_gates, active_experts
        )
        return self.down_proj(hidden, expert_gates, active_experts)


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
        expert_gates: torch.Tensor | None = None,
        active_experts: tuple[int, ...] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states, expert_gates, active_experts).view(hidden_shape)
        key_states = self.k_proj(hidden_states, expert_gates, active_experts).view(hidden_shape)
        value_states = self.v_proj(hidden_states, expert_gates, active_experts).view(hidden_shape).transpose(1, 2)
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
        return self.o_proj(attn_output, expert_gates, active_experts), attn_weights


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
        expert_gates: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        active_experts: tuple[int, ...] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # The gates arrive as an argument, not module state, so gradient checkpointing recomputes with the same ones;
        # positional, so that reentrant checkpointing also carries their gradient back to the router.
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
            expert_gates=expert_gates,
            active_experts=active_experts,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, expert_gates, active_experts)
        return residual + hidden_states


# ----------------------------------------------------------------------------------------------------- models
class PMoEPreTrainedModel(PreTrainedModel):
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
        source = pretrained_model_name_or_path
        if kwargs.get("use_safetensors", True) is False:
            raise ValueError(
                "pmoe loads weights only from safetensors: use_safetensors=False is not supported, because pickle "
                "files (pytorch_model.bin) can run code when loaded. Drop the argument."
            )
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and not str(source).endswith(
            ".safetensors"
        ):
            raise ValueError(
                f"pmoe loads weights only from safetensors, and {str(source)!r} is not a .safetensors file (pickle "
                "files can run code when loaded). Pass the checkpoint folder that save_pretrained wrote."
            )
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        kwargs["use_safetensors"] = True
        try:
            # Mismatched shapes are checked below, with a clearer error than transformers' generic one.
            model, loading_info = super().from_pretrained(
                source, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
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
        cls._check_loaded_weights(model, loading_info, source, ignore_mismatched_sizes)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _check_loaded_weights(cls, model, loading_info: dict, source, ignore_mismatched_sizes: bool):
        """Raise a `ValueError` listing every tensor of `model` the checkpoint did not fill as saved (see
        `from_pretrained`)."""
        config = model.config

        def is_pmoe_tensor(name):  # expert LoRA A/B, router keys and router statistics
            return model._expert_index_of(name) is not None or "routers" in name.split(".")

        def is_head(name):
            return name.split(".")[0] in ("lm_head", "score")

        def examples(names, limit=4):
            names = sorted(names)
            shown = ", ".join(names[:limit])
            return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

        problems = []
        missing = set(loading_info["missing_keys"])
        # Allowed: a new task head (a classifier loaded from a causal LM checkpoint) and router usage counts, which
        # checkpoints from before expert merging lack (zero, as in a fresh model).
        missing -= {name for name in missing if name.split(".")[0] in model._trainable_task_heads}
        missing -= {name for name in missing if name.endswith(".usage") and "routers" in name.split(".")}
        missing_by_expert = {}
        for name in missing:
            index = model._expert_index_of(name)
            if index is not None:
                missing_by_expert.setdefault(index, []).append(name)
        for index, names in sorted(missing_by_expert.items()):
            task = config.expert_tasks[index] if index < len(config.expert_tasks) else None
            total = len(model.expert_tensors(index)) if index < config.num_experts else len(names)
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
        other_missing = sorted(name for name in missing if model._expert_index_of(name) is None)
        if other_missing:
            problems.append(f"{len(other_missing)} tensor(s) are missing from the weights: {examples(other_missing)}.")

        unexpected = set(loading_info["unexpected_keys"])
        extra_experts = sorted({index for name in unexpected if (index := model._expert_index_of(name)) is not None})
        if extra_experts:
            names = [name for name in unexpected if model._expert_index_of(name) is not None]
            beyond = [index for index in extra_experts if index >= config.num_experts]
            hint = ("config.json lists fewer experts than were saved" if beyond else
                    "config.json builds these experts elsewhere (expert_layers, expert_target_modules or router "
                    "settings differ from the ones the weights were saved with)")
            problems.append(
                f"the weights hold {len(names)} tensor(s) of expert(s) {extra_experts} that a model built from "
                f"config.json does not have: {examples(names)}; {hint}."
            )
        other_unexpected = sorted(
            name for name in unexpected if model._expert_index_of(name) is None and not is_head(name)
        )
        if other_unexpected:
            problems.append(
                f"the weights hold {len(other_unexpected)} tensor(s) that a model built from config.json does not "
                f"have: {examples(other_unexpected)} (num_hidden_layers, expert_layers or router settings may differ)."
            )

        mismatched_by_cause = {}
        for name, saved, built in sorted(loading_info["mismatched_keys"], key=lambda item: item[0]):
            if ignore_mismatched_sizes and not is_pmoe_tensor(name):
                continue  # the caller asked transformers to re-initialise base weights of another shape
            saved, built = list(saved), list(built)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "lora_A" and len(saved) == 2 and saved[1:] == built[1:]:
                cause = (f"the saved experts have rank {saved[0]} but config.expert_rank is {config.expert_rank}: "
                         "expert_rank in config.json was changed")
            elif leaf == "lora_B" and len(saved) == 2 and saved[:1] == built[:1]:
                cause = (f"the saved experts have rank {saved[1]} but config.expert_rank is {config.expert_rank}: "
                         "expert_rank in config.json was changed")
            elif leaf == "usage" and len(saved) == 1:
                cause = (f"the saved routers count {saved[0]} experts but config.num_experts is {config.num_experts}: "
                         "num_experts / expert_tasks in config.json do not match the weights")
            elif is_head(name):
                cause = ("the head was saved with another size (num_labels or vocab_size); pass "
                         "ignore_mismatched_sizes=True to start a new head")
            else:
                cause = ("the model sizes in config.json (hidden_size, intermediate_size, num_attention_heads, "
                         "num_key_value_heads, head_dim, vocab_size) do not match the weights")
            mismatched_by_cause.setdefault(cause, []).append(
                f"{name} has shape {saved} in the weights but {built} in a model built from config.json"
            )
        for cause, shapes in mismatched_by_cause.items():
            more = f"; and {len(shapes) - 2} more tensor(s) like them" if len(shapes) > 2 else ""
            problems.append("; ".join(shapes[:2]) + more + f". Likely cause: {cause}.")
        if problems:
            where = repr(str(source)) if source is not None else "the state_dict passed"
            raise ValueError(
                f"Cannot load {cls.__name__} from {where}: the weights do not match config.json (num_experts="
                f"{config.num_experts}, expert_tasks={config.expert_tasks}, expert_rank={config.expert_rank}). "
                "Nothing is returned: transformers would re-initialise these tensors at random, a half-loaded model.\n"
                + "\n".join(f"- {problem}" for problem in problems)
                + "\nFix config.json so that it describes the saved weights (num_experts, expert_tasks, "
                "expert_train_steps, expert_rank, model sizes), or load the folder exactly as save_pretrained wrote it."
            )

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                    license: str | None = None, model_card=None) -> str:
        """`PreTrainedModel.push_to_hub` with a PMoE model card (`self.model_card(...)`, or `model_card` if given)
        instead of transformers' generic one. The card is regenerated on every push, so its expert table and results
        follow the model. Returns the commit info of the upload."""
        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card = model_card if model_card is not None else self.model_card(repo_id, tags=tags, license=license)
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, max_shard_size=max_shard_size)
            card.save(os.path.join(work_dir, "README.md"))
            return self._upload_modified_files(
                work_dir, repo_id, files_timestamps={}, commit_message=commit_message or "Upload PMoE model",
                token=token, create_pr=create_pr, revision=revision, commit_description=commit_description,
            )

    def model_card(self, repo_id: str | None = None, tags: list[str] | None = None, license: str | None = None):
        """A Hub model card (`huggingface_hub.ModelCard`): metadata (base model, library, tags, license), the layout,
        the expert table (task, index, parameters, training steps), the recorded accuracy matrix with LA / OP / BWT,
        and how to load the model without a task id."""
        from transformers.utils.hub import ModelCard, ModelCardData

        config = self.config
        card_data = ModelCardData(
            library_name="transformers",
            base_model=config.base_model_name_or_path or None,
            license=license,
            tags=list(dict.fromkeys([*(tags or []), "pmoe", "continual-learning", "mixture-of-experts", "lora",
                                     "custom_code"])),
            pipeline_tag="text-generation" if isinstance(self, GenerationMixin) else None,
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
            parameters = sum(param.numel() for param in self.expert_parameters(index).values())
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
            summary = continual_summary(matrix)
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

    def record_task_scores(self, scores: dict[str, float], metric: str = "accuracy"):
        """Append one row to the continual-learning record (`config.accuracy_matrix`): the score on each task so far,
        measured after training the latest one (tasks missing from `scores` are left empty). The model card shows it."""
        config = self.config
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

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Trainer's resume loads checkpoints with strict=False, which would silently drop the tensors of experts this
        # model does not have: refuse instead, and say how to get the right model.
        extra = sorted({index for name in state_dict if (index := self._expert_index_of(name)) is not None
                        and index >= self.config.num_experts})
        if extra:
            raise ValueError(
                f"The weights hold experts {extra} but this model has {self.config.num_experts} experts "
                f"({self.config.expert_tasks}). Load the model that matches them, e.g. "
                "PMoEForCausalLM.from_pretrained(<checkpoint>), before resuming."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -------------------------------------------------------------- growth API
    def _pmoe_model(self) -> "PMoEModel":
        model = self.base_model
        if not isinstance(model, PMoEModel):
            raise TypeError(f"{type(self).__name__} has no PMoEModel at `{self.base_model_prefix}`.")
        return model

    @property
    def training_expert(self) -> int | None:
        """The expert trained now. With Gaussian router keys, training batches are routed to it and fit its key.
        `add_expert` sets it to the new expert; the Trainer callback sets it at every task boundary."""
        return self._pmoe_model()._training_expert

    @training_expert.setter
    def training_expert(self, index: int | None):
        if index is not None and not 0 <= index < self.config.num_experts:
            raise IndexError(f"expert index {index} out of range: the model has {self.config.num_experts} experts.")
        self._pmoe_model()._training_expert = index

    def expert_linears(self) -> list[PMoELinear]:
        """Every linear that carries experts (the targeted projections of the expert layers)."""
        return [module for module in self.modules() if isinstance(module, PMoELinear) and module.with_experts]

    def expert_modules(self) -> list[PMoEExperts]:
        """Every module that carries experts: the expert linears and, with `"embed_tokens"` targeted, the embedding."""
        return [module for module in self.modules() if isinstance(module, PMoEExperts) and module.with_experts]

    def resize_token_embeddings(self, *args, **kwargs):
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        if isinstance(self.get_input_embeddings(), PMoEEmbedding):
            self.get_input_embeddings().match_vocabulary()
        return embeddings

    def expert_routers(self) -> list[PMoERouter]:
        return list(self._pmoe_model().routers)

    def expert_parameters(self, index: int) -> dict[str, nn.Parameter]:
        """The parameters of expert `index`: its LoRA A/B in every target of the expert layers, and its learned router
        key/bias (Gaussian keys are buffers: see `expert_tensors`)."""
        if not 0 <= index < self.config.num_experts:
            raise IndexError(f"expert index {index} out of range: the model has {self.config.num_experts} experts.")
        names = {}
        for name, param in self.named_parameters():
            if self._expert_index_of(name) == index:
                names[name] = param
        return names

    def expert_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """`expert_parameters(index)` plus the expert's buffers (its Gaussian router key statistics)."""
        tensors = dict(self.expert_parameters(index))
        for name, buffer in self.named_buffers():
            if self._expert_index_of(name) == index:
                tensors[name] = buffer
        return tensors

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that belongs to no expert (embeddings, attention, MLP, norms, LM head)."""
        return {name: param for name, param in self.named_parameters() if self._expert_index_of(name) is None}

    @staticmethod
    def _expert_index_of(parameter_name: str) -> int | None:
        # Expert tensors live under `...experts.{e}.` (LoRA A/B in linears, key/bias in routers).
        parts = parameter_name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "experts" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    def check_expert_start(self, option: str, source: int | None = None):
        """Refuse, before anything grows, to start a new expert as a copy of an earlier one (`option` names what asked)
        when the copy would change outputs (learned keys gate a new expert before it is trained) or `source` is not
        an expert."""
        if self.config.router_keys == "learned":
            raise ValueError(
                f"{option} needs fitted router keys (router_keys='lda' or 'gaussian'): a learned key gates a new "
                "expert before it is trained, so a copied expert would change the model's outputs."
            )
        if source is not None and (
            isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < self.config.num_experts
        ):
            raise IndexError(f"{option}={source!r} is not an expert of this model (it has {self.config.num_experts}).")

    @torch.no_grad()
    def copy_expert_weights(self, source: int, target: int):
        """Overwrite expert `target`'s LoRA A/B in every expert module with a copy of expert `source`'s (router keys
        are left as they are). In place, so an optimizer that holds the target's parameters keeps them."""
        for index in (source, target):
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.config.num_experts:
                raise IndexError(f"expert {index!r} does not exist: the model has {self.config.num_experts} experts.")
        for module in self.expert_modules():
            module.experts[target].lora_A.copy_(module.experts[source].lora_A)
            module.experts[target].lora_B.copy_(module.experts[source].lora_B)

    @torch.no_grad()
    def nearest_expert(self, batch: dict, candidates: Iterable[int] | None = None) -> int | None:
        """The expert, among `candidates` (default: every expert but `training_expert`), under which the language-model
        loss of `batch` (`input_ids`, `attention_mask`, `labels`: a training batch) is lowest, or `None` when none
        beats the model without experts. Each candidate is tried alone (its gate forced to 1), so the answer does not
        depend on the router; sequence routing only. A new task's expert can start from it (`copy_expert_weights`),
        so related tasks build on each other while unrelated ones start from PEFT's init."""
        if self.config.routing != "sequence":
            raise ValueError("nearest_expert forces one gate per sequence: it needs routing='sequence'.")
        if batch.get("labels") is None:
            raise ValueError("nearest_expert needs a batch with `labels` (the loss decides).")
        if candidates is None:
            candidates = [i for i in range(self.config.num_experts) if i != self.training_expert]
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if batch.get(key) is not None}
        rows = inputs["labels"].shape[0]
        was_training, training_expert = self.training, self.training_expert
        self.eval()  # no dropout, and no key fitting: routing_weights are given
        try:
            losses = {}
            for candidate in [None, *candidates]:
                gate = torch.zeros(rows, self.config.num_experts, device=inputs["labels"].device)
                if candidate is not None:
                    gate[:, candidate] = 1.0
                losses[candidate] = float(self(**inputs, routing_weights=gate, use_cache=False).loss)
        finally:
            self.train(was_training)
            self.training_expert = training_expert
        return min(losses, key=lambda c: (losses[c], c is not None))  # ties keep the model without experts

    def freeze_experts(self, indices: Iterable[int] | None = None, frozen: bool = True):
        """Set `requires_grad=not frozen` on the given experts (default: all) and their router entries."""
        indices = range(self.config.num_experts) if indices is None else indices
        for index in indices:
            for param in self.expert_parameters(index).values():
                param.requires_grad_(not frozen)

    def add_expert(self, task_name: str, freeze_previous: bool = True, init_from: int | None = None) -> int:
        """Grow one expert for `task_name` in every expert layer's targets and one key in every router; return its index.

        The new LoRA B starts at zero and the new router key either scores `-inf` until fitted (Gaussian and LDA keys)
        or is zero under independent sigmoid gates (learned keys), so the model's outputs do not change. With
        `init_from=i` the new expert starts as a copy of expert `i`'s LoRA A/B (its router key still starts unfitted,
        so outputs do not change either; fitted keys only). Every earlier expert and router entry is frozen unless
        `freeze_previous=False`; base weights are frozen unless `config.train_base_weights`. The new expert is
        trainable and becomes `training_expert`.
        """
        config = self.config
        if init_from is not None:
            self.check_expert_start("init_from", init_from)
        if not isinstance(task_name, str) or not task_name.strip():
            raise ValueError(f"add_expert needs a non-empty task name, got {task_name!r}.")
        if task_name in config.expert_tasks:
            raise ValueError(
                f"Task {task_name!r} already has expert {config.expert_tasks.index(task_name)}; "
                f"existing tasks: {config.expert_tasks}. Use a new task name."
            )
        if config.max_experts is not None and config.num_experts >= config.max_experts:
            raise ValueError(
                f"Cannot add expert for {task_name!r}: the model already has max_experts={config.max_experts} experts."
            )
        index = config.num_experts
        new_params = []
        for module in self.expert_modules():
            new_params += list(module.add_expert().parameters())
        reference = self.get_input_embeddings().weight
        for router in self.expert_routers():
            new_params += list(router.add_key(reference.device, reference.dtype).parameters())
        config.num_experts = index + 1
        config.expert_tasks = [*config.expert_tasks, task_name]
        config.expert_train_steps = [*config.expert_train_steps, 0]
        config.validate_pmoe()
        if init_from is not None:
            self.copy_expert_weights(init_from, index)

        if freeze_previous:
            self.freeze_experts(range(index))
        for param in self.base_parameters().values():
            param.requires_grad_(config.train_base_weights)
        for name in self._trainable_task_heads:
            getattr(self, name).requires_grad_(True)
        for param in new_params:
            param.requires_grad_(True)
        self.training_expert = index
        return index


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


class PMoEModel(PMoEPreTrainedModel):
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
        self.norm = PMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PMoERotaryEmbedding(config=config)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.gradient_checkpointing = False
        self._training_expert = None

        self.post_init()

    def _route(
        self, router: PMoERouter, hidden_states: torch.Tensor, routing_mask: torch.Tensor | None,
        sequence_ids: torch.Tensor | None = None,
    ):
        """Gates `[B, T or 1, E]` and logits from one router. While training a Gaussian-keyed expert, its task's
        batches go to it, and their features fit its key; the log window records what the router itself decided.
        Packed rows (`sequence_ids`) are routed sequence by sequence; each token gets its own sequence's gate."""
        if routing_mask is not None and routing_mask.shape[1] != hidden_states.shape[1]:
            routing_mask = routing_mask[:, -hidden_states.shape[1] :]  # a 2D mask over cached + current tokens
        # `real`: the features that stand for real tokens / sequences; a row of padding only (mean feature 0) must
        # not fit a Gaussian key, count as load or enter the logs.
        features, real = router.features(hidden_states, routing_mask, sequence_ids)
        logits, gates = router(features, routing_mask)
        forced = self._training_expert if self.training and self.config.router_keys_are_fitted else None
        if self.training:
            if forced is not None and not router.experts[forced].has_seen(self.config.router_fit_sequences):
                selected = features.reshape(-1, features.shape[-1])
                router.experts[forced].accumulate(selected if real is None else selected[real.reshape(-1)])
            router.record(gates, real, forced)
        if forced is not None:
            gates = F.one_hot(torch.full(gates.shape[:-1], forced, device=gates.device), gates.shape[-1]).float()
        if self.training:
            with torch.no_grad():
                applied = gates.reshape(-1, gates.shape[-1])
                if real is not None:
                    applied = applied[real.reshape(-1)]
                router.usage += applied.sum(0).float()
        if sequence_ids is not None:
            gates = gates.gather(1, sequence_ids[..., None].expand(-1, -1, gates.shape[-1]))
        return gates.to(hidden_states.dtype), logits

    def _key_is_fitted(self, needs_router_logits: bool) -> bool:
        """Training an expert whose fitted key has seen `router_fit_sequences` sequences: its gate is forced, so the
        expert-free pass would only refit the key and fill the logs, and is skipped. Distillation and router-logit
        outputs still need the router's logits."""
        config, expert = self.config, self._training_expert
        return (
            self.training and expert is not None and config.router_keys_are_fitted and not needs_router_logits
            and self.routers[0].experts[expert].has_seen(config.router_fit_sequences)
        )

    def _training_gate(self, inputs_embeds: torch.Tensor, sequence_ids: torch.Tensor | None) -> torch.Tensor:
        """The gate of `_route` with the trained expert forced, `[B, 1, E]` one-hot, without routing; the expert's
        usage grows by the batch's sequences, as in `_route`."""
        expert = self._training_expert
        gates = inputs_embeds.new_zeros(inputs_embeds.shape[0], 1, self.config.num_experts)
        gates[..., expert] = 1.0
        with torch.no_grad():
            sequences = inputs_embeds.shape[0] if sequence_ids is None else (sequence_ids.amax(dim=1) + 1).sum()
            self.routers[0].usage[expert] += sequences
        return gates

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

    def _shallow_prepass(self, hidden_states, attention_mask, routing_mask, mask_kwargs, layer_kwargs):
        """`expert_layers="all"`: the hidden state leaving the shallow block in a first pass without experts, so the
        gate never depends on the experts it selects. It reads and writes no cache (only the current tokens), and it
        is not part of the model's outputs (`output_hidden_states` / `output_attentions`)."""
        config = self.config
        # `generate` passes the prompt's 2D mask as `routing_mask` when it pre-builds 4D masks (static caches).
        padding_mask = routing_mask if isinstance(attention_mask, dict) else attention_mask
        if isinstance(attention_mask, dict) and routing_mask is None:
            raise ValueError(
                "expert_layers='all' computes its gate from an expert-free shallow pass, which needs the 2D "
                "attention mask: pass it as `routing_mask` when `attention_mask` is a dict of prebuilt masks."
            )
        if config.router_input_layer == 0:  # the router reads the token embeddings: no layer to run
            return hidden_states
        length = hidden_states.shape[1]
        if isinstance(padding_mask, torch.Tensor) and padding_mask.dim() == 2 and padding_mask.shape[1] != length:
            padding_mask = padding_mask[:, -length:]  # continuing from a cache: the mask also covers cached tokens
        masks = self._causal_masks({**mask_kwargs, "attention_mask": padding_mask, CACHE_KWARG: None})
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.router_keys == "learned"), outputs_not_captured():
            for layer_idx in range(config.router_input_layer):
                hidden_states = self.layers[layer_idx](
                    hidden_states, None, attention_mask=masks[config.layer_types[layer_idx]], use_cache=False,
                    **layer_kwargs,
                )
        return hidden_states

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
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        config = self.config
        has_experts = config.num_experts > 0
        sequence_routing = has_experts and config.routing == "sequence"
        # Packed rows, detected as transformers' masks detect them (given positions, no 2D mask, no cache).
        sequence_ids = None
        if sequence_routing and position_ids is not None and attention_mask is None and cache is None:
            sequence_ids = find_packed_sequence_indices(position_ids.expand(inputs_embeds.shape[0], -1))
        if sequence_routing:
            routing_weights = self._carried_gate(cache, routing_weights, inputs_embeds.shape[0])
        if input_ids is None and config.expert_embeddings and has_experts and (
            routing_weights is None or routing_weights.any()
        ):
            raise ValueError(
                "This PMoE model has embedding experts ('embed_tokens' in config.expert_target_modules): they look up "
                "token ids, so a forward from `inputs_embeds` cannot apply them and would not compute this model. "
                "Pass `input_ids`, or convert the dense model with expert_target_modules without 'embed_tokens'."
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            CACHE_KWARG: cache,
            "position_ids": position_ids,
        }
        # `generate` may pass the masks already built, one per layer type (static caches, compiled generation).
        if not isinstance(causal_masks := attention_mask, dict):
            causal_masks = self._causal_masks(mask_kwargs)
        if routing_mask is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            routing_mask = attention_mask

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        layer_kwargs = dict(position_embeddings=position_embeddings, position_ids=position_ids, **kwargs)

        first_deep = config.num_shallow_layers
        expert_gates = None
        router_logits = ()
        output_router_logits = output_router_logits if output_router_logits is not None else config.output_router_logits
        if sequence_routing and routing_weights is not None:  # shape and values checked by check_model_inputs
            expert_gates = routing_weights[:, None, :].to(inputs_embeds.dtype)
        elif sequence_routing and config.expert_layers == "all" and self._key_is_fitted(
            compute_old_model or output_router_logits
        ):
            expert_gates = self._training_gate(inputs_embeds, sequence_ids)
        elif sequence_routing and config.expert_layers == "all":
            boundary = self._shallow_prepass(inputs_embeds, attention_mask, routing_mask, mask_kwargs, layer_kwargs)
            expert_gates, logits = self._route(self.routers[0], boundary, routing_mask, sequence_ids)
            router_logits += (logits.reshape(-1, logits.shape[-1]),)
        active_for, active_gates, active_experts = None, None, None
        if config.expert_embeddings and expert_gates is not None:
            active_for, (active_gates, active_experts) = expert_gates, gates_of_active_experts(expert_gates)
            hidden_states = self._with_embedding_experts(input_ids, inputs_embeds, active_gates, active_experts)

        first_expert_layer = config.expert_layer_indices[0]
        old_model_input = None
        for layer_idx, decoder_layer in enumerate(self.layers[: config.num_hidden_layers]):
            if compute_old_model and layer_idx == first_expert_layer:
                old_model_input = inputs_embeds if layer_idx == 0 else hidden_states  # (embedding experts: redone)
            if has_experts and layer_idx == config.router_input_layer and expert_gates is None:
                expert_gates, logits = self._route(self.routers[0], hidden_states, routing_mask, sequence_ids)
                router_logits += (logits.reshape(-1, logits.shape[-1]),)
            if has_experts and layer_idx > first_deep:
                if config.router_per_layer:
                    expert_gates, logits = self._route(
                        self.routers[layer_idx - first_deep], hidden_states, routing_mask, sequence_ids
                    )
                    router_logits += (logits.reshape(-1, logits.shape[-1]),)
            if expert_gates is not active_for:
                active_for, (active_gates, active_experts) = expert_gates, gates_of_active_experts(expert_gates)
            hidden_states = decoder_layer(
                hidden_states,
                active_gates if decoder_layer.has_experts else None,
                attention_mask=causal_masks[config.layer_types[layer_idx]],
                use_cache=use_cache,
                active_experts=active_experts,
                **{CACHE_KWARG: cache},
                **layer_kwargs,
            )
        hidden_states = self.norm(hidden_states)

        old_last_hidden_state = None
        if compute_old_model:
            old_last_hidden_state = self._old_model_pass(
                old_model_input, router_logits, first_expert_layer, causal_masks, layer_kwargs, sequence_ids, input_ids
            )

        # With sequence routing, each sequence's gate: returned for `generate` to feed back, and carried by the cache.
        sequence_gates = None
        if sequence_routing and expert_gates is not None and sequence_ids is None:
            sequence_gates = expert_gates[:, 0, :].float()
            if use_cache and cache is not None:
                cache.pmoe_routing_weights = sequence_gates
        return PMoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            router_logits=router_logits if output_router_logits and has_experts else None,
            routing_weights=sequence_gates,
            old_last_hidden_state=old_last_hidden_state,
            **{CACHE_KWARG: cache if use_cache else None},
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
            old_gates = old_gates.to(hidden_states.dtype)
        old_gates, active_experts = gates_of_active_experts(old_gates)
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

    def _with_embedding_experts(self, input_ids, inputs_embeds, gates, active_experts=None):
        """The token embeddings plus the gated embedding experts' update (`"embed_tokens"` in expert_target_modules)."""
        if input_ids is None:
            return inputs_embeds  # only with an all-zero gate (checked in `forward`)
        update = self.embed_tokens.expert_update_for(input_ids, gates, active_experts)
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

    # -------------------------------------------------------------- expert merging (Park 2024)
    def expert_usage(self) -> torch.Tensor:
        """Gate mass each expert received in training forwards, summed over routers (saved in checkpoints)."""
        return torch.stack([router.usage for router in self.expert_routers()]).sum(0).cpu()

    @torch.no_grad()
    def merge_experts(self, method: str = "svd", sources: tuple[int, int] | None = None,
                      target: int | None = None) -> tuple[int, int, int]:
        """Merge two experts and write the result over a third (Park 2024); return `(source, source, target)`.

        By default the sources are the two most used experts and the target is the least used other one, all three
        chosen among the experts not being trained. `method="average"` averages the LoRA factors (the paper's merge); `method="svd"` writes
        the best rank-r approximation of the sum of the two experts' updates (`B_i A_i + B_j A_j`) into the target's
        rank-r factors. The target's router key covers both sources (Gaussian statistics are added; learned keys are
        averaged) and its task name becomes `"<source>+<source>"`.
        """
        config = self.config
        if method not in ("svd", "average"):
            raise ValueError(f"merge_experts: method must be 'svd' or 'average', got {method!r}.")
        usage = self.expert_usage()
        # The expert being trained is never picked automatically: it is still learning its task.
        candidates = [e for e in range(config.num_experts) if e != self.training_expert]
        if sources is None:
            if len(candidates) < 3:
                raise ValueError(
                    f"merge_experts needs at least 3 experts besides the one being trained to pick two sources and a "
                    f"different target; the model has {config.num_experts} (training expert: {self.training_expert})."
                )
            ranked = sorted(candidates, key=lambda e: (-usage[e].item(), e))
            sources = (ranked[0], ranked[1])
        first, second = sources
        if first == second or not all(0 <= e < config.num_experts for e in (first, second)):
            raise ValueError(f"merge_experts: sources must be two different experts in [0, {config.num_experts}), "
                             f"got {sources}.")
        if target is None:
            targets = [e for e in candidates if e not in (first, second)]
            if not targets:
                raise ValueError("merge_experts: no expert left to overwrite (not a source, not being trained).")
            target = min(targets, key=lambda e: (usage[e].item(), -e))
        if not 0 <= target < config.num_experts:
            raise ValueError(f"merge_experts: target must be in [0, {config.num_experts}), got {target}.")

        for module in self.expert_modules():
            a, b = module.experts[first], module.experts[second]
            if method == "average":
                lora_a, lora_b = (a.lora_A + b.lora_A) / 2, (a.lora_B + b.lora_B) / 2
            else:
                lora_a, lora_b = best_low_rank_factors_of_sum(
                    [(a.lora_B.float(), a.lora_A.float()), (b.lora_B.float(), b.lora_A.float())], module.rank
                )
            module.experts[target].lora_A.copy_(lora_a)
            module.experts[target].lora_B.copy_(lora_b)
        for router in self.expert_routers():
            merged, a, b = router.experts[target], router.experts[first], router.experts[second]
            if merged.kind != "learned":
                for name in merged.statistics:
                    getattr(merged, name).copy_(getattr(a, name) + getattr(b, name))
            else:
                merged.key.copy_((a.key + b.key) / 2)
                merged.bias.copy_((a.bias + b.bias) / 2)
            router.usage[target] = router.usage[first] + router.usage[second]
        tasks, steps = list(config.expert_tasks), list(config.expert_train_steps)
        tasks[target] = f"{tasks[first]}+{tasks[second]}"
        steps[target] = steps[first] + steps[second]
        config.expert_tasks, config.expert_train_steps = tasks, steps
        config.validate_pmoe()
        return first, second, target

    def remove_expert(self, index: int):
        """Delete expert `index` from every linear and router; later experts move down one index, and the config's
        tasks, training steps and accuracy record lose its entry. Used to cap the expert count after a merge."""
        config = self.config
        if not 0 <= index < config.num_experts:
            raise IndexError(f"expert index {index} out of range: the model has {config.num_experts} experts.")
        for module in self.expert_modules():
            del module.experts[index]
            module.__dict__.pop("_concat_cache", None)
        for router in self.expert_routers():
            del router.experts[index]
            router.usage = torch.cat([router.usage[:index], router.usage[index + 1 :]])
            router._log_stats = None
        config.num_experts -= 1
        config.expert_tasks = [task for e, task in enumerate(config.expert_tasks) if e != index]
        config.expert_train_steps = [steps for e, steps in enumerate(config.expert_train_steps) if e != index]
        if config.accuracy_matrix:
            config.accuracy_matrix = [[v for e, v in enumerate(row) if e != index] for row in config.accuracy_matrix]
        training = self.training_expert
        self.training_expert = None if training in (None, index) else training - (training > index)
        config.validate_pmoe()

    def cap_experts(self, max_experts: int, method: str = "svd") -> list[tuple[str, str]]:
        """Merge experts until at most `max_experts` remain: each time, the two most used experts (never the one being
        trained) are merged into the first of them (`merge_experts`) and the second is removed. Returns the merged
        task pairs. With Gaussian keys the merged key is fitted on both tasks' statistics, so both still route to it."""
        if isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < 1:
            raise ValueError(f"cap_experts: max_experts must be an integer >= 1, got {max_experts!r}.")
        merged = []
        while self.config.num_experts > max_experts:
            usage = self.expert_usage()
            candidates = [e for e in range(self.config.num_experts) if e != self.training_expert]
            if len(candidates) < 2:
                raise ValueError(
                    f"cap_experts: cannot go down to {max_experts} experts: fewer than two experts besides the one "
                    "being trained."
                )
            first, second = sorted(sorted(candidates, key=lambda e: (-usage[e].item(), e))[:2])
            pair = (self.config.expert_tasks[first], self.config.expert_tasks[second])
            self.merge_experts(method, sources=(first, second), target=first)
            self.remove_expert(second)
            merged.append(pair)
        return merged

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
        missing = [name for name in missing if "routers" not in name.split(".")]
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
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        cache = one_cache_argument(cache, past_key_values)
        if routing_mask is None and labels is not None and self.config.routing == "sequence":
            given = input_ids if input_ids is not None else inputs_embeds
            if given is not None and given.dim() >= 2 and labels.shape != given.shape[:2]:
                raise ValueError(
                    f"labels has shape {tuple(labels.shape)} but the input is {tuple(given.shape[:2])}: they must match."
                )
            check_attention_mask(attention_mask, labels.shape[0], labels.shape[1], has_cache=cache is not None)
            routing_mask = prompt_mask_from_labels(labels, attention_mask)
        distill = self.training and labels is not None and self.config.distillation_alpha > 0
        outputs: PMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            routing_weights=routing_weights,
            routing_mask=routing_mask,
            compute_old_model=distill,
            **kwargs,
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
            loss = loss + self.config.distillation_alpha * distillation_loss

        aux_loss = None
        # Load balancing trains router keys; Gaussian keys are fitted, not trained, so there is nothing to balance.
        if output_router_logits and outputs.router_logits and self.config.router_keys == "learned":
            token_mask = attention_mask if self.config.routing != "sequence" and isinstance(attention_mask, torch.Tensor) else None
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.config.num_experts,
                max(1, self.config.effective_top_k),
                token_mask if token_mask is not None and token_mask.dim() == 2 else None,
            )
            if labels is not None and self.config.router_aux_loss_coef > 0:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

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


def continual_summary(matrix: list[list[float | None]]) -> dict[str, float]:
    """LA (mean diagonal), OP (mean last row) and BWT of a lower-triangular accuracy record (rows may be partial);
    empty when the diagonal or the last row is incomplete."""
    size = len(matrix)
    diagonal = [matrix[i][i] if i < len(matrix[i]) else None for i in range(size)]
    last = matrix[-1][:size]
    if any(value is None for value in diagonal) or len(last) < size or any(value is None for value in last):
        return {}
    summary = {"LA": sum(diagonal) / size, "OP": sum(last) / size}
    if size > 1:
        summary["BWT"] = sum(last[j] - diagonal[j] for j in range(size - 1)) / (size - 1)
    return summary


def best_low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` with `B @ A` the best rank-`rank` approximation of `delta` (Eckart-Young, via SVD)."""
    u, singular_values, vh = torch.linalg.svd(delta, full_matrices=False)
    root = singular_values[:rank].sqrt()
    lora_b = u[:, :rank] * root
    lora_a = root[:, None] * vh[:rank]
    if lora_a.shape[0] < rank:  # delta smaller than the rank: pad with zero directions
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - lora_a.shape[0], lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - lora_b.shape[1])], dim=1)
    return lora_a, lora_b


def best_low_rank_factors_of_sum(pairs: list[tuple[torch.Tensor, torch.Tensor]], rank: int):
    """`(A, B)` with `B @ A` the best rank-`rank` approximation of `sum(B_i @ A_i)`, from the factors: thin QR of the
    stacked factors and an SVD of their small core, so the `[out, in]` product is never formed (an embedding expert's
    would be `[hidden, vocab]`)."""
    q_b, r_b = torch.linalg.qr(torch.cat([lora_b for lora_b, _ in pairs], dim=1))  # [out, k], [k, k]
    q_a, r_a = torch.linalg.qr(torch.cat([lora_a for _, lora_a in pairs], dim=0).T)  # [in, k], [k, k]
    core_a, core_b = best_low_rank_factors(r_b @ r_a.T, rank)
    return core_a @ q_a.T, q_b @ core_b


def old_model_kl(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over trained positions (shifted labels != -100) of KL(p_old || p_new) over the vocabulary."""
    trained = labels[:, 1:] != -100
    new_log_probs = F.log_softmax(logits[:, :-1][trained].float(), dim=-1)
    old_log_probs = F.log_softmax(old_logits[:, :-1][trained].float(), dim=-1)
    if new_log_probs.shape[0] == 0:
        return logits.sum() * 0.0
    return F.kl_div(new_log_probs, old_log_probs, log_target=True, reduction="batchmean")


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
