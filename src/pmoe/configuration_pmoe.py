# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""PMoE model configuration.

This file is shipped inside every checkpoint as remote code: it imports only the standard library and
transformers.
"""

import copy

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


# The version of this code, which travels with every checkpoint as remote code: the pmoe package version
# (`pmoe.__version__`, and pyproject.toml reads it from here) and what `save_pretrained` records in config.json.
PMOE_VERSION = "0.1.0"

# Bump when the checkpoint layout changes in a way older pmoe versions cannot read.
PMOE_FORMAT_VERSION = 1

EXPERT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The token embedding can carry experts too (PEFT's LoRA on `nn.Embedding`); only with `expert_layers="all"`, where the
# gate is known before the first layer.
EMBEDDING_TARGET = "embed_tokens"


def default_expert_target_modules(expert_layers: str) -> list[str]:
    """The experts' targets when `expert_target_modules` is not given: the seven projections, and the token embedding
    with experts in every layer (`"all"`). Benchmarks give their PEFT LoRA peers the same list."""
    return list(EXPERT_TARGET_MODULES) + ([EMBEDDING_TARGET] if expert_layers == "all" else [])


ROUTER_ACTIVATIONS = ("sigmoid", "softmax")
ROUTING_MODES = ("sequence", "token", "expert_choice")
ROUTER_KEY_TYPES = ("gaussian", "lda", "learned")
EXPERT_LAYER_CHOICES = ("deep", "all")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# Dense causal LMs `from_dense` converts: `model_type` -> class name.
SUPPORTED_DENSE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_DENSE_MODEL_TYPES = tuple(SUPPORTED_DENSE_ARCHITECTURES)


def _fail(field, allowed, value):
    raise ValueError(f"PMoEConfig.{field} must be {allowed}, got {value!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a PMoE model: a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 weights load by copying)
    whose deep layers carry progressive LoRA experts chosen by a router at the shallow/deep boundary.

    Llama-family fields (same meaning as in `LlamaConfig`): `vocab_size`, `hidden_size`, `intermediate_size`,
    `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim`, `hidden_act`,
    `max_position_embeddings`, `initializer_range`, `rms_norm_eps`, `use_cache`, `tie_word_embeddings`,
    `rope_parameters`, `attention_bias`, `attention_dropout`, `mlp_bias`, token ids. Family extras:

    - `attention_out_bias` (`bool`, *optional*): bias of `o_proj`. `None` follows `attention_bias` (Llama, Qwen3);
      Qwen2 has biases on q/k/v but not on o, so its conversion sets `False`.
    - `qk_norm` (`bool`, defaults to `False`): RMSNorm on each query/key head before RoPE (Qwen3).
    - `sliding_window` (`int`, *optional*) and `layer_types` (list of `"full_attention"` / `"sliding_attention"`,
      one per layer): sliding-window attention as in Mistral / Qwen2 / Qwen3. `None` means full attention everywhere.

    PMoE fields:

    - `num_shallow_layers` (`int`, *optional*, defaults to `num_hidden_layers // 2`): S. Layers `[0, S)` are the
      shallow block (base weights only, general knowledge); layers `[S, L)` are the deep block and carry the experts.
      Allowed: `0 <= S <= num_hidden_layers - 1`.
    - `expert_rank` (`int`, defaults to 8): LoRA rank r of every expert.
    - `expert_alpha` (`float`, *optional*, defaults to `2 * expert_rank`): LoRA alpha. The expert update is scaled by
      `alpha / r` (or `alpha / sqrt(r)` with `expert_use_rslora`). The default keeps `alpha / r = 2` whatever the rank,
      so changing the rank does not silently change the update's scale (a fixed alpha of 16 halves it at rank 16).
    - `expert_use_rslora` (`bool`, defaults to `False`): rank-stabilised scaling `alpha / sqrt(r)`.
    - `expert_dropout` (`float`, defaults to 0.0): dropout on the expert input, as PEFT's `lora_dropout`.
    - `expert_target_modules` (list of `str`, defaults to all seven projections, plus `embed_tokens` with
      `expert_layers="all"`): which modules of the expert layers carry experts, among `q_proj, k_proj, v_proj, o_proj,
      gate_proj, up_proj, down_proj`, and `embed_tokens`: a LoRA expert on the token embedding (PEFT's LoRA on
      `nn.Embedding`: `A` `[r, vocab]` starts at zero, `B` `[hidden, r]` normal), gated like the layers' experts.
      It needs `expert_layers="all"` (the gate comes from an expert-free pass, so it is known before the first layer).
      It is in the default because full fine-tuning changes the embeddings and a LoRA on the projections alone learned
      much less on the built-in character-level tasks (README, "Learning as much as full fine-tuning"); it adds
      `rank * (vocab_size + hidden_size)` parameters per task. Checkpoints saved without it keep their saved list.
    - `routing` (`"sequence"`, `"token"` or `"expert_choice"`, defaults to `"sequence"`): route once per sequence, from
      the mean boundary feature of its prompt (training: the tokens whose label is -100, or every token when none is;
      generation: the prefill, whose gate is reused at every decode step), or per token (the paper's setting). A
      prototype routed about 100% of each task's sequences to its own expert at sequence level and 8-84% of its tokens
      at token level. `"expert_choice"` is pMoE's prioritized routing (Chowdhury et al. 2023; expert choice, Zhou et
      al. 2022): every expert takes its `expert_capacity` highest-scoring non-padding tokens of each sequence and the
      other tokens get no update from it. It looks at the whole sequence, so it is for `PMoEForSequenceClassification`;
      `PMoEForCausalLM` refuses it.
    - `expert_capacity` (`int` or `float`, *optional*): expert-choice routing only. An integer is the number of tokens
      each expert takes per sequence; a float in (0, 1] is a fraction of the sequence's non-padding tokens (rounded
      up). `None` takes `ceil(tokens / num_experts)`, capacity factor 1 as in Zhou et al. Never more than the
      sequence's non-padding tokens.
    - `router_keys` (`"lda"`, `"gaussian"`, `"learned"` or `None`, defaults to `None`): what scores an expert; `None`
      picks `"lda"`, or `"learned"` for expert-choice routing (pMoE trains its router). LDA is the default because it
      routed best on real text whose instruction does not name the task (`benchmarks/cl_benchmark.py`, O-LoRA's
      tasks: 99.9% against 98.1% for the diagonal Gaussian on the Standard order, 99.1% against 96.0% on the Long
      Sequence). `"gaussian"`: a
      diagonal Gaussian of the routing feature per task, fitted from the features the task's training batches produce
      (no raw data kept, statistics saved with the model); the score is the log-likelihood and, with softmax, the gate
      is the posterior over tasks. While an expert is trained with Gaussian (or LDA) keys its own task's batches are
      routed to it (`model.training_expert`). `"lda"`: a linear discriminant, one Gaussian per task with a covariance
      shared by all tasks (with shrinkage), from per-task count / sum / sum of outer products of the (projected)
      routing feature. Its decision is the one an LDA fitted jointly on every task's features would make, so it uses
      correlations between feature dimensions that the diagonal `"gaussian"` keys ignore, and no task's spread can
      make it absorb another's. `"learned"`: a key vector and bias per expert, trained by gradient descent.
    - `router_projection_size` (`int`, defaults to 256): `"lda"` keys only. The routing feature is multiplied by a fixed
      random `[P, hidden_size]` matrix (saved with the router) before fitting, so each key stores `P * P + P + 1`
      float64 numbers whatever the hidden size (256: 0.5 MiB per expert per router). At or above `hidden_size` the
      feature is used as is (`hidden_size ** 2` numbers per key).
    - `router_shrinkage` (`float`, defaults to 0.1): `"lda"` keys only. The shared covariance is shrunk towards its
      mean variance times the identity, `(1 - s) * Sigma + s * trace(Sigma) / P * I` (plus `router_variance_floor`),
      so it stays invertible and well conditioned with fewer sequences than feature dimensions.
    - `router_activation` (`"sigmoid"`, `"softmax"` or `None`, defaults to `None`): how router logits become gates.
      `None` picks `"softmax"` for Gaussian keys and `"sigmoid"` for learned keys. Sigmoid gates are independent per
      expert, so adding a learned expert (zero key, zero LoRA B) leaves every old gate, and thus the model's outputs,
      unchanged. Softmax gates are normalised across experts: a new *learned* expert takes a share of every token's gate
      mass, so old outputs move when it is added. A new Gaussian key scores `-inf` until it is fitted, so growth is exact.
    - `router_variance_floor` (`float`, defaults to 1e-3): added to every Gaussian key's variance (features are
      RMS-normalised, so about 1e-3 of a feature's scale), so a key fitted on few sequences is not infinitely sharp.
    - `router_fit_sequences` (`int` or `None`, defaults to 2048): while an expert with a fitted key (LDA, Gaussian)
      trains, its key is fitted on the expert-free features of its task's first `router_fit_sequences` training
      sequences (counted per process). With `expert_layers="all"` those features come from an extra pass through the
      shallow block without experts; once the key has seen enough sequences, training steps skip that pass (the gate
      is forced to the trained expert anyway), so they cost what a LoRA step costs. The features do not change during
      training (base weights are frozen), so a sample estimates the key as well as every step would: 1000 prompts
      per task already route 99-100% of the real-text benchmark's test prompts. The router logs
      (`router/load`, `router/agreement`) cover the fitting steps only. `None` fits on every training sequence.
    - `expert_layers` (`"all"`, `"deep"` or `None`, defaults to `None`: `"all"` with sequence routing, `"deep"`
      otherwise): `"deep"` is the paper's asymmetric layout, experts in the deep layers only. `"all"` also puts them in
      the shallow layers, gated by the sequence gate computed from a first pass through the shallow block without
      experts (one extra shallow forward at prefill, none per decode step); the shallow base weights stay frozen and
      the gate still comes from the boundary features. It is the default because deep-only experts learned far less on
      the quality benchmark (`benchmarks/continual.py`: LA 16% against 44% on the built-in tasks, both with BWT 0);
      choose `"deep"` for the cheaper prefill. Needs `routing="sequence"`.
    - `router_top_k` (`int`, *optional*): `None` or `0` means dense gating (every expert, gate from the activation).
      `k > 0` keeps the `k` highest-scoring experts per sequence (or token) (softmax renormalised over them) and zeroes the rest.
      While the model has fewer than `k` experts, all of them are used. Must not exceed `max_experts` when that is set.
    - `router_temperature` (`float`, defaults to 1.0): router logits are divided by it before the activation.
    - `router_min_gate` (`float`, defaults to 0.01): softmax gates only. An expert whose gate is below `router_min_gate`
      times the largest gate of its row (sequence or token) is dropped and the kept gates are renormalised: the gate is
      the softmax over the kept experts' logits, so it does not depend on the dropped experts at all. Inference then
      computes only the experts that matter (a confidently routed prompt uses one expert whatever the expert count),
      and an expert that stays under the floor for an old task's inputs, such as a newer task's expert, changes none
      of that task's outputs, bit for bit. 0 keeps every expert (dense softmax). Applied after `router_top_k`; not to
      sigmoid gates (independent per expert, nothing to renormalise) or expert-choice routing.
    - `router_per_layer` (`bool`, defaults to `False`): one router per deep layer, each reading the hidden state that
      enters its layer, instead of one shared router at the boundary. Needs token-level (or expert-choice) routing.
    - `router_input_layer` (`int`, *optional*, defaults to `num_shallow_layers`): the router reads the hidden state
      entering this layer. The default is the boundary (the deep features PMoE routes on). With `expert_layers="all"`
      the expert-free pass that computes the gate runs the layers below it, so a smaller value makes prefill cheaper
      (0: the router reads the token embeddings and prefill costs what the dense model's does) and routes less well
      on real text whose tasks share an instruction (README, "Where the router reads": LDA 95.1% at 0, 98.4% at 1,
      99.1% at the boundary on O-LoRA's Long Sequence). Allowed: `0 <= router_input_layer <= num_shallow_layers`.
    - `router_aux_loss_coef` (`float`, defaults to 0.0): weight of the load-balancing loss (Switch / Mixtral) added to
      the LM loss when `output_router_logits=True`. Off by default: balancing old, frozen experts against a new one
      fights continual learning.
    - `output_router_logits` (`bool`, defaults to `False`): return router logits (and the auxiliary loss).
    - `num_experts` (`int`) and `expert_tasks` (list of `str`): the experts the model has and the task each belongs
      to, in order. Written by `add_expert`; `from_pretrained` rebuilds exactly these experts.
    - `expert_train_steps` (list of `int`): optimizer steps each expert was trained for (kept by the Trainer callback).
    - `max_experts` (`int`, *optional*): refuse to grow past this many experts.
    - `train_base_weights` (`bool`, defaults to `False`): when `add_expert` sets up a task, keep the base (non-expert)
      weights trainable. By default growth freezes them.
    - `distillation_alpha` (`float`, defaults to 0.0): Lifelong-MoE regularisation. While training, add
      `alpha * KL(old || new)` on the trained positions, where "old" is this model with the expert being trained masked
      out of routing, computed without gradients and without a copy of the model (the expert layers run twice). Off by
      default until the benchmark shows it helps. Needs `router_per_layer=False`.
    - `base_model_name_or_path` (`str`, *optional*) and `dense_model_type` (`str`, *optional*): the dense model
      `from_dense` converted (the model card's `base_model`) and its `model_type` (`"llama"`, `"qwen3"`, ...).
    - `accuracy_matrix` (list of lists of `float`, *optional*) and `accuracy_metric` (`str`, *optional*): the
      continual-learning record, one row per `model.record_task_scores(...)` (the Trainer callback's `evaluate_fn`):
      row i holds the score on every task known then, measured after training task i. The model card shows it with
      LA / OP / BWT.
    - `pmoe_format_version` (`int`): checkpoint layout version, checked on load.
    - `pmoe_version` (`str`, *optional*): the pmoe version that wrote the config.json this config was loaded from,
      as `transformers_version` records the transformers version. Never set it: saving (`save_pretrained`,
      `to_json_string`, `to_dict`) always writes the version of the code doing the save (`PMOE_VERSION`), so a
      checkpoint written by an older pmoe keeps showing that version after `from_pretrained` until it is saved
      again. `None` for a config built in memory, or loaded from a config.json written before pmoe recorded it.
      Informative only: compatibility is checked with `pmoe_format_version`.
    """

    model_type = "pmoe"
    # Output fields the Trainer drops from evaluation outputs: the cache is `past_key_values` up to transformers
    # 5.23 and `cache` from 5.24.
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    base_model_tp_plan = None
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # Llama family
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool | None = None
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    # PMoE
    num_shallow_layers: int | None = None
    expert_rank: int = 8
    expert_alpha: float | None = None
    expert_use_rslora: bool = False
    expert_dropout: float = 0.0
    expert_target_modules: list[str] | None = None
    routing: str = "sequence"
    router_keys: str | None = None
    router_activation: str | None = None
    router_variance_floor: float = 1e-3
    router_projection_size: int = 256
    router_shrinkage: float = 0.1
    router_fit_sequences: int | None = 2048
    expert_layers: str | None = None
    router_top_k: int | None = None
    expert_capacity: int | float | None = None
    router_temperature: float = 1.0
    router_min_gate: float = 0.01
    router_per_layer: bool = False
    router_input_layer: int | None = None
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    num_experts: int = 0
    expert_tasks: list[str] | None = None
    expert_train_steps: list[int] | None = None
    max_experts: int | None = None
    train_base_weights: bool = False
    distillation_alpha: float = 0.0
    base_model_name_or_path: str | None = None
    dense_model_type: str | None = None
    accuracy_matrix: list[list[float | None]] | None = None
    accuracy_metric: str | None = None
    pmoe_format_version: int = PMOE_FORMAT_VERSION
    pmoe_version: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_shallow_layers is None:
            self.num_shallow_layers = self.num_hidden_layers // 2
        if self.router_input_layer is None:
            self.router_input_layer = self.num_shallow_layers
        if self.expert_alpha is None:
            self.expert_alpha = 2.0 * self.expert_rank
        if self.expert_layers is None:
            self.expert_layers = "all" if self.routing == "sequence" else "deep"
        if self.expert_target_modules is None:
            self.expert_target_modules = default_expert_target_modules(self.expert_layers)
        # A string would silently become a list of its characters below (`list("sql")`): refuse it.
        for field in ("expert_target_modules", "expert_tasks", "expert_train_steps"):
            if isinstance(getattr(self, field), str):
                raise ValueError(f"PMoEConfig.{field} must be a list, got the string {getattr(self, field)!r}.")
        self.expert_target_modules = list(self.expert_target_modules)
        self.expert_tasks = list(self.expert_tasks) if self.expert_tasks is not None else []
        if self.expert_train_steps is None:
            self.expert_train_steps = [0] * len(self.expert_tasks)
        self.expert_train_steps = list(self.expert_train_steps)
        if self.router_keys is None:
            self.router_keys = "learned" if self.routing == "expert_choice" else "lda"
        if self.router_activation is None:
            self.router_activation = "sigmoid" if self.router_keys == "learned" else "softmax"
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.validate_pmoe()

    # ------------------------------------------------------------------ validation
    def validate(self):
        super().validate()
        self.validate_pmoe()

    def validate_pmoe(self):
        """Raise a `ValueError` naming the field and its allowed range for every invalid PMoE setting."""
        self._validate_base_model()
        self._validate_layout()
        self._validate_router()
        self._validate_routing_combinations()
        self._validate_growth()

    def _validate_base_model(self):
        """The dense model's shape: sizes, heads, layer types, the checkpoint format."""
        if self.pmoe_format_version is None or not _is_int(self.pmoe_format_version) or self.pmoe_format_version < 1:
            _fail("pmoe_format_version", f"an integer in [1, {PMOE_FORMAT_VERSION}]", self.pmoe_format_version)
        if self.pmoe_format_version > PMOE_FORMAT_VERSION:
            raise ValueError(
                f"PMoEConfig.pmoe_format_version is {self.pmoe_format_version}, but this pmoe reads checkpoint "
                f"format versions up to {PMOE_FORMAT_VERSION}: the checkpoint was made by a newer pmoe. "
                "Upgrade pmoe (`pip install -U pmoe`) or load it with the remote code saved next to it."
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                _fail(field, "a positive integer", value)
        if not _is_int(self.num_key_value_heads) or not 1 <= self.num_key_value_heads <= self.num_attention_heads:
            _fail("num_key_value_heads", f"an integer in [1, num_attention_heads={self.num_attention_heads}]",
                  self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            _fail("num_key_value_heads", f"a divisor of num_attention_heads={self.num_attention_heads}",
                  self.num_key_value_heads)
        if not _is_int(self.head_dim) or self.head_dim < 1 or self.head_dim % 2:
            _fail("head_dim", "a positive even integer", self.head_dim)
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers or any(
            kind not in ATTENTION_LAYER_TYPES for kind in self.layer_types
        ):
            _fail("layer_types", f"a list of {self.num_hidden_layers} values from {list(ATTENTION_LAYER_TYPES)}",
                  self.layer_types)
        if "sliding_attention" in self.layer_types and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            _fail("sliding_window", "a positive integer when layer_types contains 'sliding_attention'",
                  self.sliding_window)

    def _validate_layout(self):
        """The asymmetric layout and the experts: shallow block, router input, rank, alpha, targets."""
        last = self.num_hidden_layers - 1
        if not _is_int(self.num_shallow_layers) or not 0 <= self.num_shallow_layers <= last:
            _fail("num_shallow_layers", f"an integer in [0, num_hidden_layers - 1] = [0, {last}]",
                  self.num_shallow_layers)
        if not _is_int(self.router_input_layer) or not 0 <= self.router_input_layer <= self.num_shallow_layers:
            _fail("router_input_layer", f"an integer in [0, num_shallow_layers] = [0, {self.num_shallow_layers}]",
                  self.router_input_layer)
        if self.router_per_layer and self.router_input_layer != self.num_shallow_layers:
            _fail("router_input_layer", "num_shallow_layers when router_per_layer=True", self.router_input_layer)
        if not _is_int(self.expert_rank) or self.expert_rank < 1:
            _fail("expert_rank", "an integer >= 1", self.expert_rank)
        if isinstance(self.expert_alpha, bool) or not isinstance(self.expert_alpha, (int, float)) or not (
            self.expert_alpha > 0
        ):
            _fail("expert_alpha", "a number > 0 (or None for 2 * expert_rank)", self.expert_alpha)
        if isinstance(self.expert_dropout, bool) or not isinstance(self.expert_dropout, (int, float)) or not (
            0.0 <= self.expert_dropout < 1.0
        ):
            _fail("expert_dropout", "a number in [0, 1)", self.expert_dropout)
        choices = [*EXPERT_TARGET_MODULES, EMBEDDING_TARGET]
        unknown = [name for name in self.expert_target_modules if name not in choices]
        if unknown or not self.expert_target_modules or len(set(self.expert_target_modules)) != len(
            self.expert_target_modules
        ):
            _fail("expert_target_modules", f"a non-empty list of distinct names from {choices}",
                  self.expert_target_modules)

    def _validate_router(self):
        """The router's own settings: activation, routing mode, keys and their fitting."""
        if self.router_activation not in ROUTER_ACTIVATIONS:
            _fail("router_activation", f"one of {list(ROUTER_ACTIVATIONS)} (or None for the keys' default)",
                  self.router_activation)
        if self.routing not in ROUTING_MODES:
            _fail("routing", f"one of {list(ROUTING_MODES)}", self.routing)
        if self.router_keys not in ROUTER_KEY_TYPES:
            _fail("router_keys", f"one of {list(ROUTER_KEY_TYPES)}", self.router_keys)
        if isinstance(self.router_projection_size, bool) or not (
            _is_int(self.router_projection_size) and self.router_projection_size >= 1
        ):
            _fail("router_projection_size", "an integer >= 1", self.router_projection_size)
        if isinstance(self.router_shrinkage, bool) or not (
            isinstance(self.router_shrinkage, (int, float)) and 0.0 <= self.router_shrinkage <= 1.0
        ):
            _fail("router_shrinkage", "a number in [0, 1]", self.router_shrinkage)
        if self.router_fit_sequences is not None and not (
            _is_int(self.router_fit_sequences) and self.router_fit_sequences >= 1
        ):
            _fail("router_fit_sequences", "None or an integer >= 1", self.router_fit_sequences)
        if self.expert_layers not in EXPERT_LAYER_CHOICES:
            _fail("expert_layers", f"one of {list(EXPERT_LAYER_CHOICES)}", self.expert_layers)
        if self.router_per_layer and self.routing == "sequence":
            _fail("router_per_layer", "False with routing='sequence' (a sequence gate comes from one boundary router)",
                  self.router_per_layer)

    def _validate_routing_combinations(self):
        """Settings that only make sense together (expert choice, embedding experts, ...)."""
        if self.expert_capacity is not None:
            if self.routing != "expert_choice":
                _fail("expert_capacity", "None unless routing='expert_choice'", self.expert_capacity)
            capacity = self.expert_capacity
            if isinstance(capacity, bool) or not (
                (_is_int(capacity) and capacity >= 1) or (isinstance(capacity, float) and 0 < capacity <= 1)
            ):
                _fail("expert_capacity", "an integer >= 1 (tokens per expert) or a float in (0, 1] (a fraction of "
                      "the sequence)", capacity)
        if self.routing == "expert_choice" and self.router_top_k:
            _fail("router_top_k", "None with routing='expert_choice' (experts pick tokens; set expert_capacity)",
                  self.router_top_k)
        if self.routing == "expert_choice" and self.distillation_alpha:
            _fail("distillation_alpha", "0 with routing='expert_choice' (distillation is for causal LM training)",
                  self.distillation_alpha)
        if EMBEDDING_TARGET in self.expert_target_modules and self.expert_layers != "all":
            _fail("expert_target_modules", f"a list without {EMBEDDING_TARGET!r} unless expert_layers='all' (embedding "
                  "experts need the gate before the first layer, which only the expert-free shallow pass gives)",
                  self.expert_target_modules)
        if self.expert_layers == "all" and self.routing != "sequence":
            _fail("expert_layers", "'deep' unless routing='sequence' (shallow experts are gated by the sequence gate "
                  "of an expert-free shallow pass)", self.expert_layers)
        if isinstance(self.router_variance_floor, bool) or not isinstance(
            self.router_variance_floor, (int, float)
        ) or not self.router_variance_floor > 0:
            _fail("router_variance_floor", "a number > 0", self.router_variance_floor)
        if isinstance(self.router_temperature, bool) or not isinstance(self.router_temperature, (int, float)) or not (
            self.router_temperature > 0
        ):
            _fail("router_temperature", "a number > 0", self.router_temperature)
        if isinstance(self.router_min_gate, bool) or not isinstance(self.router_min_gate, (int, float)) or not (
            0 <= self.router_min_gate < 1
        ):
            _fail("router_min_gate", "a number in [0, 1) (0 keeps every expert)", self.router_min_gate)
        if isinstance(self.router_aux_loss_coef, bool) or not isinstance(self.router_aux_loss_coef, (int, float)) or (
            not self.router_aux_loss_coef >= 0
        ):
            _fail("router_aux_loss_coef", "a number >= 0", self.router_aux_loss_coef)

    def _validate_growth(self):
        """Distillation and the experts grown so far: counts, caps, task names, training steps."""
        if isinstance(self.distillation_alpha, bool) or not isinstance(self.distillation_alpha, (int, float)) or not (
            0 <= self.distillation_alpha < float("inf")
        ):
            _fail("distillation_alpha", "a finite number >= 0 (0 turns distillation off)", self.distillation_alpha)
        if self.distillation_alpha > 0 and self.router_per_layer:
            _fail("distillation_alpha", "0 with router_per_layer=True (the old-model pass needs one shared router)",
                  self.distillation_alpha)
        if not _is_int(self.num_experts) or self.num_experts < 0:
            _fail("num_experts", "an integer >= 0", self.num_experts)
        if self.max_experts is not None and (
            not _is_int(self.max_experts) or self.max_experts < max(1, self.num_experts)
        ):
            _fail("max_experts", f"None or an integer >= max(1, num_experts={self.num_experts})", self.max_experts)
        if self.router_top_k is not None:
            upper = self.max_experts if self.max_experts is not None else "max_experts"
            if not _is_int(self.router_top_k) or self.router_top_k < 0 or (
                self.max_experts is not None and self.router_top_k > self.max_experts
            ):
                _fail("router_top_k", f"None, 0 (dense) or an integer in [1, {upper}]", self.router_top_k)
        if len(self.expert_tasks) != self.num_experts or not all(
            isinstance(task, str) and task for task in self.expert_tasks
        ):
            _fail("expert_tasks", f"a list of num_experts={self.num_experts} non-empty task names", self.expert_tasks)
        if len(set(self.expert_tasks)) != len(self.expert_tasks):
            _fail("expert_tasks", "a list of distinct task names", self.expert_tasks)
        if len(self.expert_train_steps) != self.num_experts or not all(
            _is_int(steps) and steps >= 0 for steps in self.expert_train_steps
        ):
            _fail("expert_train_steps", f"a list of num_experts={self.num_experts} integers >= 0",
                  self.expert_train_steps)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """The config as a dictionary, with `pmoe_version` set to the version of this code, as transformers sets
        `transformers_version`: everything that writes config.json goes through here, so the file records the pmoe
        that wrote it."""
        output = super().to_dict()
        output["pmoe_version"] = PMOE_VERSION
        return output

    # ------------------------------------------------------------------ helpers
    @property
    def router_keys_are_fitted(self) -> bool:
        """Gaussian and LDA keys are fitted from the trained expert's features, not trained by gradient."""
        return self.router_keys != "learned"

    @property
    def router_feature_size(self) -> int:
        """The size of the feature a router key is fitted on: the LDA projection when it is smaller than the hidden
        size, else the hidden size."""
        if self.router_keys == "lda":
            return min(self.router_projection_size, self.hidden_size)
        return self.hidden_size

    @property
    def expert_projections(self) -> list[str]:
        """The targeted projections of the expert layers (`expert_target_modules` without `embed_tokens`)."""
        return [name for name in self.expert_target_modules if name != EMBEDDING_TARGET]

    @property
    def expert_embeddings(self) -> bool:
        """Whether the token embedding carries experts (`"embed_tokens"` in `expert_target_modules`)."""
        return EMBEDDING_TARGET in self.expert_target_modules

    @property
    def expert_scaling(self) -> float:
        """The factor applied to every expert's LoRA update (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA)."""
        denominator = self.expert_rank**0.5 if self.expert_use_rslora else self.expert_rank
        return float(self.expert_alpha) / denominator

    @property
    def deep_layer_indices(self) -> list[int]:
        return list(range(self.num_shallow_layers, self.num_hidden_layers))

    @property
    def expert_layer_indices(self) -> list[int]:
        """The layers whose targeted projections carry experts."""
        first = 0 if self.expert_layers == "all" else self.num_shallow_layers
        return list(range(first, self.num_hidden_layers))

    @property
    def effective_top_k(self) -> int:
        """How many experts each token uses now: `router_top_k` capped at `num_experts` (0 experts: 0)."""
        if not self.router_top_k:
            return self.num_experts
        return min(self.router_top_k, self.num_experts)

    @classmethod
    def from_dense_config(cls, dense_config, **pmoe_options) -> "PMoEConfig":
        """Build a `PMoEConfig` with no experts from the config of a Llama, Mistral, Qwen2 or Qwen3 causal LM.

        `pmoe_options` are PMoE fields (`num_shallow_layers`, `expert_rank`, `router_top_k`, ...).
        """
        model_type = getattr(dense_config, "model_type", None)
        if model_type not in SUPPORTED_DENSE_MODEL_TYPES:
            supported = ", ".join(f"{name} ({kind})" for kind, name in SUPPORTED_DENSE_ARCHITECTURES.items())
            raise ValueError(
                f"Cannot convert a dense model of type {model_type!r} to PMoE. Supported architectures: {supported}."
            )
        forbidden = {"num_experts", "expert_tasks", "expert_train_steps"} & set(pmoe_options)
        if forbidden:
            raise ValueError(
                f"from_dense builds a model with no experts; grow them with add_expert(task_name) instead of passing "
                f"{sorted(forbidden)}."
            )
        pmoe_fields = {
            "num_shallow_layers", "expert_rank", "expert_alpha", "expert_use_rslora", "expert_dropout",
            "expert_target_modules", "routing", "router_keys", "router_activation", "router_variance_floor",
            "router_projection_size", "router_shrinkage", "router_fit_sequences", "expert_layers", "router_top_k",
            "expert_capacity", "router_temperature", "router_min_gate", "router_per_layer", "router_input_layer",
            "router_aux_loss_coef", "output_router_logits", "max_experts", "train_base_weights", "distillation_alpha",
        }
        unknown = sorted(set(pmoe_options) - pmoe_fields)
        if unknown:
            raise ValueError(f"Unknown PMoE option(s) {unknown}; allowed: {sorted(pmoe_fields)}.")

        c = dense_config
        num_heads = c.num_attention_heads
        fields = {
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // num_heads,
            "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_position_embeddings,
            "initializer_range": c.initializer_range,
            "rms_norm_eps": c.rms_norm_eps,
            "use_cache": getattr(c, "use_cache", True),
            "pad_token_id": c.pad_token_id,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "tie_word_embeddings": c.tie_word_embeddings,
            "rope_parameters": copy.deepcopy(c.rope_parameters),
            "attention_dropout": getattr(c, "attention_dropout", 0.0),
        }
        if model_type == "llama":
            fields.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
        elif model_type == "mistral":
            # Mistral applies its sliding window (when set) in every layer.
            sliding = c.sliding_window
            kind = "sliding_attention" if sliding is not None else "full_attention"
            fields.update(sliding_window=sliding, layer_types=[kind] * c.num_hidden_layers)
        elif model_type == "qwen2":
            fields.update(
                attention_bias=True, attention_out_bias=False,
                sliding_window=c.sliding_window, layer_types=list(c.layer_types),
            )
        elif model_type == "qwen3":
            fields.update(
                attention_bias=c.attention_bias, qk_norm=True,
                sliding_window=c.sliding_window, layer_types=list(c.layer_types),
            )
        if "sliding_attention" not in (fields.get("layer_types") or []):
            fields["sliding_window"] = None
        fields.update(pmoe_options)
        return cls(**fields)


__all__ = [
    "PMoEConfig",
    "PMOE_FORMAT_VERSION",
    "EMBEDDING_TARGET",
    "EXPERT_TARGET_MODULES",
    "SUPPORTED_DENSE_ARCHITECTURES",
    "default_expert_target_modules",
    "SUPPORTED_DENSE_MODEL_TYPES",
]
