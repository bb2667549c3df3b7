# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""The mixture-of-experts parts of PMoE: the progressive LoRA experts, the router keys, the router and the routing
functions that turn router logits into gates.

- `PMoELinear` / `PMoEEmbedding`: a base `nn.Linear` / `nn.Embedding` plus one LoRA expert per task
  (`...experts.{e}.lora_A` / `.lora_B`, PEFT's LoRA layout), mixed by the gates the model passes in.
- `PMoERouterKey` / `PMoERouter`: one key per expert (learned, or fitted statistics: Gaussian or LDA) that scores
  the routing features of a token or a sequence.
- `route` / `expert_choice_route`: logits to gates (softmax or sigmoid, top-k, gate floor; pMoE's expert choice).
- `expert_index_of`: which expert a tensor name belongs to (the one place that knows the naming).

Shipped inside every checkpoint as remote code with `modeling_pmoe.py`: it imports only torch, transformers and
`configuration_pmoe`.
"""

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.utils import logging

from .configuration_pmoe import PMoEConfig


logger = logging.get_logger(__name__)


def expert_index_of(tensor_name: str) -> int | None:
    """The expert a parameter or buffer belongs to, from its name, or `None` for a base tensor. Expert tensors live
    under `...experts.{e}.`: LoRA A/B in the expert modules, keys and statistics in the routers."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "experts" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


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

    def grow_expert(self) -> PMoELoRAExpert:
        """Append one new expert (LoRA B or, for the embedding, A at zero: it changes nothing until trained); the
        model's `add_expert` grows one in every expert module at once."""
        expert = self.expert_class(*self.expert_shape, self.rank)
        expert.to(device=self.weight.device, dtype=self.weight.dtype)
        self.experts.append(expert)
        return expert

    def add_expert(self) -> PMoELoRAExpert:
        """Deprecated name of `grow_expert` (the model's `add_expert` grows a whole task's expert)."""
        logger.warning_once(f"{type(self).__name__}.add_expert() is deprecated: call grow_expert().")
        return self.grow_expert()

    def expert_update(
        self, project_a: Callable, expert_gates: torch.Tensor | None, active_experts: tuple[int, ...] | None,
        rank_gates: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The gated sum of the experts' updates, or `None` when no expert applies (see `gated_expert_input`)."""
        gated = self.gated_expert_input(project_a, expert_gates, active_experts, rank_gates)
        return None if gated is None else F.linear(*gated)

    def gated_expert_input(
        self, project_a: Callable, expert_gates: torch.Tensor | None, active_experts: tuple[int, ...] | None,
        rank_gates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(gated, B_cat)`, whose `F.linear` is the gated sum of the experts' updates, or `None` when no expert applies.
        `project_a(A_cat)` maps the input through the concatenated A (`[..., E * r]`); `gated` is that, each rank column
        times its expert's gate and the LoRA scaling.

        `active_experts`: the experts that run (`None`: all of them), so top-k and sequence routing cost what the chosen
        experts cost, not all experts. The gates come either as `rank_gates` (`[..., E * r]`, `expert_rank_gates` of
        the active experts' gates: what the model passes, worked out once per forward) or as `expert_gates`, where
        `expert_gates[..., j]` is the gate of `active_experts[j]` (gates over all experts are also accepted and the
        active ones taken here)."""
        num_experts = len(self._modules["experts"])  # (`_modules` / `_parameters` here and in `_concatenated`: plain
        # dict look-ups, 0.3 us a call instead of nn.Module's attribute fallbacks' 1.9: `benchmarks/expert_update.py`)
        if num_experts == 0 or active_experts == () or (expert_gates is None and rank_gates is None):
            return None
        if rank_gates is None:
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
        if rank_gates is None:
            rank_gates = expert_rank_gates(expert_gates, self.rank, self.scaling, hidden.dtype)
        elif rank_gates.shape[-1] != lora_a.shape[0]:
            raise ValueError(f"{type(self).__name__} got rank gates for {rank_gates.shape[-1]} columns but its active "
                             f"experts have {lora_a.shape[0]} (rank {self.rank}).")
        return hidden * rank_gates, lora_b

    def _concatenated(self, active_experts: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`A_cat [E*r, in]` and `B_cat [out, E*r]` of the active experts (`None`: all). Without autograd (inference)
        the concatenation is cached until one of the tensors changes (tensor version counters), so decoding does not
        copy the experts at every token."""
        if active_experts is not None and len(active_experts) == 1:  # sequence routing's usual case: no copy
            parameters = self._modules["experts"]._modules[str(active_experts[0])]._parameters
            return parameters["lora_A"], parameters["lora_B"]
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
        self, x: torch.Tensor, expert_gates: torch.Tensor | None = None, active_experts: tuple[int, ...] | None = None,
        rank_gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        source = self.expert_dropout(x) if self.training else x  # (dropout is the identity in eval: skip the call)
        gated = self.gated_expert_input(lambda lora_a: F.linear(source, lora_a), expert_gates, active_experts,
                                        rank_gates)
        if gated is None:
            return out
        gated, lora_b = gated
        # `out += gated @ B^T` as one GEMM into the base output, in place: the update is never written out and read
        # back, and no new output is allocated and copied (a fifth of an unmerged LoRA's cost over the base layer at
        # decode, about half at a 512-token prefill, on CPU: `benchmarks/expert_update.py`). `out` is this call's own
        # tensor, and linear's backward does not read it. One row (decode at batch 1): the matrix-vector form.
        if out.numel() == out.shape[-1]:
            out.view(-1).addmv_(lora_b, gated.reshape(-1))
        else:
            out.view(-1, out.shape[-1]).addmm_(gated.reshape(-1, gated.shape[-1]), lora_b.T)
        return out

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
        self, input_ids: torch.Tensor, expert_gates: torch.Tensor | None, active_experts: tuple[int, ...] | None = None,
        rank_gates: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        return self.expert_update(lambda lora_a: F.embedding(input_ids, lora_a.T, self.padding_idx), expert_gates,
                                  active_experts, rank_gates)

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
    covariance (see `PMoERouter.lda_weights`). `closed` (not saved): a fitting pass over the task's training data
    completed the key (`fit_router_key`), so training forwards add nothing to it.
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
        self.closed = False
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

    def is_fitted(self, sequences: int | None) -> bool:
        """Whether a fitted key needs no more features: it is `closed`, or its count has reached `sequences` (`None`:
        never). The answer is cached until the count changes (tensor version counter), so once a key is fitted
        enough, asking costs no device-to-host read."""
        if self.kind == "learned":
            return False
        if self.closed:
            return True
        if sequences is None:
            return False
        version = (self.count._version, self.count.data_ptr())
        cached = self.__dict__.get("_count_reached")
        if cached is None or cached[:2] != (version, sequences):
            cached = (version, sequences, bool(self.count >= sequences))
            self.__dict__["_count_reached"] = cached
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
    entries freeze on their own. (`experts` holds the router keys, not the experts: the name is part of every
    checkpoint's tensor names, and `expert_index_of` reads the expert index from it.)

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

    def real_features(
        self, hidden_states: torch.Tensor, routing_mask: torch.Tensor | None, sequence_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`features` flattened to `[n, P]` and kept only where real: what fitting a key takes."""
        features, real = self.features(hidden_states, routing_mask, sequence_ids)
        features = features.reshape(-1, features.shape[-1])
        return features if real is None else features[real.reshape(-1)]

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

    def training_step(
        self, features: torch.Tensor, real: torch.Tensor | None, gates: torch.Tensor, forced_expert: int | None,
        fit_sequences: int | None,
    ) -> torch.Tensor:
        """The router's training bookkeeping, all of it, for one training forward: while a fitted-key expert is
        trained (`forced_expert`), its task's features `[B, G, P]` fit its key until it has seen `fit_sequences`
        sequences (or a fitting pass closed it) and its gate is forced; the log window records what the router itself
        decided (`gates`); the usage counts the gate applied, which is returned. `real` (`[B, G]`): the features of
        real tokens / sequences."""
        if forced_expert is not None and not self.experts[forced_expert].is_fitted(fit_sequences):
            selected = features.reshape(-1, features.shape[-1])
            self.experts[forced_expert].accumulate(selected if real is None else selected[real.reshape(-1)])
        self.record(gates, real, forced_expert)
        if forced_expert is not None:
            gates = F.one_hot(torch.full(gates.shape[:-1], forced_expert, device=gates.device), gates.shape[-1]).float()
        with torch.no_grad():
            applied = gates.reshape(-1, gates.shape[-1])
            if real is not None:
                applied = applied[real.reshape(-1)]
            self.usage += applied.sum(0).float()
        return gates

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


def expert_rank_gates(gates: torch.Tensor, rank: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """`[..., E] -> [..., E * r]`: each expert's gate times the LoRA scaling, once for each of its rank columns of
    `A_cat x`. Every expert module of a model shares rank and scaling, so the model works this out once per gate."""
    return (gates.to(dtype) * scaling).repeat_interleave(rank, dim=-1)


def expert_gate_inputs(
    gates: torch.Tensor | None, rank: int, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """What the expert modules take, worked out once per routing decision instead of once per module: the rank gates
    (`expert_rank_gates`) of the experts that run, and their indices (`None`: all experts run)."""
    if gates is None:
        return None, None
    active = active_expert_indices(gates)
    if active is not None:
        gates = gates[..., list(active)]
    return expert_rank_gates(gates, rank, scaling, dtype), active


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


def screen_is_sure(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Per row of screen logits `[B, E]`: whether the best expert scores at least `margin` above the runner-up (an
    unfitted runner-up scores `-inf`: sure; no fitted expert: not sure)."""
    top = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    best = top[:, 0]
    runner_up = top[:, 1] if top.shape[-1] > 1 else torch.full_like(best, float("-inf"))
    return (best - runner_up >= margin) & best.isfinite()


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
