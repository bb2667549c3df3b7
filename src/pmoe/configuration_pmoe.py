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
    - `router_fit_sequences` (`int` or `None`, defaults to 2048): how many of a task's training sequences fit its
      key (LDA, Gaussian), from their expert-free features. With `expert_layers="all"` the Trainer callback fits it in
      one pass over a random sample of that many of the task's examples before the task's first step
      (`fit_router_key`), so no training step runs the expert-free shallow pass (the gate is forced to the trained
      expert anyway) and a step costs what a LoRA step costs. Otherwise (no callback, the deep-only layout whose
      forward reads the features at no extra cost, an iterable dataset) the training forwards fit it on their first
      `router_fit_sequences` sequences (counted per process), then stop. The features do not change during training
      (base weights are frozen), so a sample estimates the key as well as every step would: 1000 prompts per task
      already route 99-100% of the real-text benchmark's test prompts. The router logs (`router/load`,
      `router/agreement`) cover the fitting only. `None` fits on every training sequence.
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
    - `router_screen_margin` (`float` or `None`, defaults to 20.0): with experts in every layer, sequence routing and
      LDA keys (the defaults), a second router, the *screen*, reads the token embeddings (the input of layer 0, no
      layer to run) with LDA keys fitted on the same sequences as the boundary router's. Where its best expert's
      score beats the runner-up's by at least this margin (log-odds: e^20 to 1 at 20), the screen's gate routes the
      prompt and prefill skips the expert-free shallow pass; every other prompt is routed at the boundary as before. On
      O-LoRA's Long Sequence the screen routed 50.5% of the test prompts and routing accuracy stayed exactly the
      boundary router's, task by task (the screen's wrong picks scored margins up to 9.4; README, "Where the router
      reads"). Prompts of tasks that share an instruction and a vocabulary are left to the boundary (in a batch, the pass
      runs for those rows only). Not with Gaussian keys: their diagonal log-likelihoods on the embeddings are
      overconfident (a trial on the same benchmark routed worse at the same margin). It does not apply while training,
      when router logits are asked for (distillation, `output_router_logits`), or until every expert with a fitted
      boundary key has a screen key (checkpoints saved before the screen have none: they always take the pass).
      `None`: no screen.
    - `router_first_layer_screen` (`bool`, defaults to `True`): with the embedding screen and a router reading layer 2
      or later, a second screen reads the output of the first layer in the expert-free pass (LDA keys fitted on the
      same sequences, the same margin). A prompt the embedding screen is not sure of runs that one layer of the pass;
      where the first-layer screen is sure, its gate routes the prompt and the rest of the pass is skipped. On
      O-LoRA's Long Sequence it routed 38.3% of the test prompts (77% of those the embedding screen left), so only
      11.2% ran the whole pass, and routing accuracy stayed the boundary router's, task by task (README, "Where the
      router reads"). It stays off until every expert with a fitted boundary key has a key in it (checkpoints saved
      before it: the embedding screen and the boundary route as before, until `fit_router_key(...,
      missing_screen_keys_only=True)` gives the old experts their keys). Setting it to `False` on a loaded model's
      config turns it off at once; a model built with `False` has no first-layer screen (and its checkpoints none).
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
    router_screen_margin: float | None = 20.0
    router_first_layer_screen: bool = True
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
        validate_pmoe_config(self)

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
    def uses_router_screen(self) -> bool:
        """Whether the model has the embedding screen (`router_screen_margin`): only where the gate comes from an
        expert-free pass it could skip (experts in every layer, one sequence router reading a later layer, LDA keys)."""
        return (
            self.router_screen_margin is not None and self.expert_layers == "all" and self.routing == "sequence"
            and self.router_keys == "lda" and not self.router_per_layer and self.router_input_layer > 0
        )

    @property
    def uses_first_layer_screen(self) -> bool:
        """Whether the model has the first-layer screen (`router_first_layer_screen`): with the embedding screen, where
        the expert-free pass runs at least two layers (one to read, at least one to skip)."""
        return self.uses_router_screen and self.router_first_layer_screen and self.router_input_layer >= 2

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

        `pmoe_options` are PMoE fields (`num_shallow_layers`, `expert_rank`, `router_top_k`, ...; `PMOE_OPTIONS`).
        """
        forbidden = {"num_experts", "expert_tasks", "expert_train_steps"} & set(pmoe_options)
        if forbidden:
            raise ValueError(
                f"from_dense builds a model with no experts; grow them with add_expert(task_name) instead of passing "
                f"{sorted(forbidden)}."
            )
        unknown = sorted(set(pmoe_options) - PMOE_OPTIONS)
        if unknown:
            raise ValueError(f"Unknown PMoE option(s) {unknown}; allowed: {sorted(PMOE_OPTIONS)}.")
        return cls(**dense_config_fields(dense_config), **pmoe_options)


# ----------------------------------------------------------------------------------------------------- validation
def _fail(field, allowed, value):
    raise ValueError(f"PMoEConfig.{field} must be {allowed}, got {value!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_of(choices, note=""):
    return lambda value: value in choices, f"one of {list(choices)}{note}"


# The fields checked on their own, in order: `field: (test, what the field must be)`. The relations between fields
# come after, in `validate_pmoe_config`.
_FIELD_RULES = {
    **{field: (lambda value: _is_int(value) and value >= 1, "a positive integer") for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
    "expert_rank": (lambda value: _is_int(value) and value >= 1, "an integer >= 1"),
    "expert_alpha": (lambda value: _is_number(value) and value > 0, "a number > 0 (or None for 2 * expert_rank)"),
    "expert_dropout": (lambda value: _is_number(value) and 0.0 <= value < 1.0, "a number in [0, 1)"),
    "router_activation": _one_of(ROUTER_ACTIVATIONS, " (or None for the keys' default)"),
    "routing": _one_of(ROUTING_MODES),
    "router_keys": _one_of(ROUTER_KEY_TYPES),
    "router_projection_size": (lambda value: _is_int(value) and value >= 1, "an integer >= 1"),
    "router_shrinkage": (lambda value: _is_number(value) and 0.0 <= value <= 1.0, "a number in [0, 1]"),
    "router_fit_sequences": (lambda value: value is None or (_is_int(value) and value >= 1),
                             "None or an integer >= 1"),
    "expert_layers": _one_of(EXPERT_LAYER_CHOICES),
    "router_variance_floor": (lambda value: _is_number(value) and value > 0, "a number > 0"),
    "router_temperature": (lambda value: _is_number(value) and value > 0, "a number > 0"),
    "router_min_gate": (lambda value: _is_number(value) and 0 <= value < 1,
                        "a number in [0, 1) (0 keeps every expert)"),
    "router_aux_loss_coef": (lambda value: _is_number(value) and value >= 0, "a number >= 0"),
    "router_screen_margin": (lambda value: value is None or (_is_number(value) and 0 < value < float("inf")),
                             "None (no screen) or a finite number > 0"),
    "router_first_layer_screen": (lambda value: isinstance(value, bool), "True or False"),
    "distillation_alpha": (lambda value: _is_number(value) and 0 <= value < float("inf"),
                           "a finite number >= 0 (0 turns distillation off)"),
    "num_experts": (lambda value: _is_int(value) and value >= 0, "an integer >= 0"),
}


def validate_pmoe_config(config: "PMoEConfig"):
    """Raise a `ValueError` naming the field and its allowed values for the first invalid PMoE setting: the
    checkpoint format, every field of `_FIELD_RULES`, then the dense shape, the layout, the routing combinations and
    the experts grown so far."""
    version = config.pmoe_format_version
    if not _is_int(version) or version < 1:
        _fail("pmoe_format_version", f"an integer in [1, {PMOE_FORMAT_VERSION}]", version)
    if version > PMOE_FORMAT_VERSION:
        raise ValueError(
            f"PMoEConfig.pmoe_format_version is {version}, but this pmoe reads checkpoint format versions up to "
            f"{PMOE_FORMAT_VERSION}: the checkpoint was made by a newer pmoe. Upgrade pmoe (`pip install -U pmoe`) "
            "or load it with the remote code saved next to it."
        )
    for field, (test, allowed) in _FIELD_RULES.items():
        if not test(getattr(config, field)):
            _fail(field, allowed, getattr(config, field))
    _check_dense_shape(config)
    _check_layout(config)
    _check_routing_combinations(config)
    _check_growth(config)


def _check_dense_shape(config):
    """Heads, head size and layer types of the dense model."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if not _is_int(kv_heads) or not 1 <= kv_heads <= heads:
        _fail("num_key_value_heads", f"an integer in [1, num_attention_heads={heads}]", kv_heads)
    if heads % kv_heads != 0:
        _fail("num_key_value_heads", f"a divisor of num_attention_heads={heads}", kv_heads)
    if not _is_int(config.head_dim) or config.head_dim < 1 or config.head_dim % 2:
        _fail("head_dim", "a positive even integer", config.head_dim)
    layer_types = config.layer_types
    if not isinstance(layer_types, list) or len(layer_types) != config.num_hidden_layers or any(
        kind not in ATTENTION_LAYER_TYPES for kind in layer_types
    ):
        _fail("layer_types", f"a list of {config.num_hidden_layers} values from {list(ATTENTION_LAYER_TYPES)}",
              layer_types)
    if "sliding_attention" in layer_types and (not _is_int(config.sliding_window) or config.sliding_window < 1):
        _fail("sliding_window", "a positive integer when layer_types contains 'sliding_attention'",
              config.sliding_window)


def _check_layout(config):
    """The asymmetric layout: shallow block, router input, expert targets."""
    last, shallow = config.num_hidden_layers - 1, config.num_shallow_layers
    if not _is_int(shallow) or not 0 <= shallow <= last:
        _fail("num_shallow_layers", f"an integer in [0, num_hidden_layers - 1] = [0, {last}]", shallow)
    if not _is_int(config.router_input_layer) or not 0 <= config.router_input_layer <= shallow:
        _fail("router_input_layer", f"an integer in [0, num_shallow_layers] = [0, {shallow}]",
              config.router_input_layer)
    if config.router_per_layer and config.router_input_layer != shallow:
        _fail("router_input_layer", "num_shallow_layers when router_per_layer=True", config.router_input_layer)
    targets, choices = config.expert_target_modules, [*EXPERT_TARGET_MODULES, EMBEDDING_TARGET]
    if not targets or any(name not in choices for name in targets) or len(set(targets)) != len(targets):
        _fail("expert_target_modules", f"a non-empty list of distinct names from {choices}", targets)


def _check_routing_combinations(config):
    """Settings that only make sense together (per-layer routers, expert choice, embedding experts, ...)."""
    if config.router_per_layer and config.routing == "sequence":
        _fail("router_per_layer", "False with routing='sequence' (a sequence gate comes from one boundary router)",
              config.router_per_layer)
    capacity = config.expert_capacity
    if capacity is not None:
        if config.routing != "expert_choice":
            _fail("expert_capacity", "None unless routing='expert_choice'", capacity)
        if not ((_is_int(capacity) and capacity >= 1) or (isinstance(capacity, float) and 0 < capacity <= 1)):
            _fail("expert_capacity", "an integer >= 1 (tokens per expert) or a float in (0, 1] (a fraction of the "
                  "sequence)", capacity)
    if config.routing == "expert_choice" and config.router_top_k:
        _fail("router_top_k", "None with routing='expert_choice' (experts pick tokens; set expert_capacity)",
              config.router_top_k)
    if config.routing == "expert_choice" and config.distillation_alpha:
        _fail("distillation_alpha", "0 with routing='expert_choice' (distillation is for causal LM training)",
              config.distillation_alpha)
    if EMBEDDING_TARGET in config.expert_target_modules and config.expert_layers != "all":
        _fail("expert_target_modules", f"a list without {EMBEDDING_TARGET!r} unless expert_layers='all' (embedding "
              "experts need the gate before the first layer, which only the expert-free shallow pass gives)",
              config.expert_target_modules)
    if config.expert_layers == "all" and config.routing != "sequence":
        _fail("expert_layers", "'deep' unless routing='sequence' (shallow experts are gated by the sequence gate of "
              "an expert-free shallow pass)", config.expert_layers)
    if config.distillation_alpha > 0 and config.router_per_layer:
        _fail("distillation_alpha", "0 with router_per_layer=True (the old-model pass needs one shared router)",
              config.distillation_alpha)


def _check_growth(config):
    """The experts grown so far: caps, top-k, task names, training steps."""
    num_experts, cap, top_k = config.num_experts, config.max_experts, config.router_top_k
    if cap is not None and (not _is_int(cap) or cap < max(1, num_experts)):
        _fail("max_experts", f"None or an integer >= max(1, num_experts={num_experts})", cap)
    if top_k is not None and (not _is_int(top_k) or top_k < 0 or (cap is not None and top_k > cap)):
        _fail("router_top_k", f"None, 0 (dense) or an integer in [1, {cap if cap is not None else 'max_experts'}]",
              top_k)
    tasks = config.expert_tasks
    if len(tasks) != num_experts or not all(isinstance(task, str) and task for task in tasks):
        _fail("expert_tasks", f"a list of num_experts={num_experts} non-empty task names", tasks)
    if len(set(tasks)) != len(tasks):
        _fail("expert_tasks", "a list of distinct task names", tasks)
    steps = config.expert_train_steps
    if len(steps) != num_experts or not all(_is_int(step) and step >= 0 for step in steps):
        _fail("expert_train_steps", f"a list of num_experts={num_experts} integers >= 0", steps)


# ----------------------------------------------------------------------------------------------------- conversion
# The PMoE fields `from_dense_config` / `PMoEForCausalLM.from_dense` take (experts are grown, never passed).
PMOE_OPTIONS = frozenset({
    "num_shallow_layers", "expert_rank", "expert_alpha", "expert_use_rslora", "expert_dropout",
    "expert_target_modules", "routing", "router_keys", "router_activation", "router_variance_floor",
    "router_projection_size", "router_shrinkage", "router_fit_sequences", "expert_layers", "router_top_k",
    "expert_capacity", "router_temperature", "router_min_gate", "router_per_layer", "router_input_layer",
    "router_screen_margin", "router_first_layer_screen", "router_aux_loss_coef", "output_router_logits", "max_experts",
    "train_base_weights", "distillation_alpha",
})


def dense_config_fields(dense_config) -> dict:
    """The `PMoEConfig` fields that reproduce a Llama, Mistral, Qwen2 or Qwen3 causal LM's config."""
    model_type = getattr(dense_config, "model_type", None)
    if model_type not in SUPPORTED_DENSE_MODEL_TYPES:
        supported = ", ".join(f"{name} ({kind})" for kind, name in SUPPORTED_DENSE_ARCHITECTURES.items())
        raise ValueError(
            f"Cannot convert a dense model of type {model_type!r} to PMoE. Supported architectures: {supported}."
        )
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
        kind = "sliding_attention" if c.sliding_window is not None else "full_attention"
        fields.update(sliding_window=c.sliding_window, layer_types=[kind] * c.num_hidden_layers)
    elif model_type == "qwen2":
        fields.update(attention_bias=True, attention_out_bias=False, sliding_window=c.sliding_window,
                      layer_types=list(c.layer_types))
    elif model_type == "qwen3":
        fields.update(attention_bias=c.attention_bias, qk_norm=True, sliding_window=c.sliding_window,
                      layer_types=list(c.layer_types))
    if "sliding_attention" not in (fields.get("layer_types") or []):
        fields["sliding_window"] = None
    return fields


__all__ = [
    "PMoEConfig",
    "PMOE_FORMAT_VERSION",
    "EMBEDDING_TARGET",
    "EXPERT_TARGET_MODULES",
    "SUPPORTED_DENSE_ARCHITECTURES",
    "default_expert_target_modules",
    "SUPPORTED_DENSE_MODEL_TYPES",
    "PMOE_OPTIONS",
    "dense_config_fields",
    "validate_pmoe_config",
]
