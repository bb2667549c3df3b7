# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""The growth API of every PMoE model (`PMoEGrowthMixin`): add an expert per task, freeze, copy, merge, remove and cap
experts, and the one freeze policy of continual training (`set_trainable`).

Shipped inside every checkpoint as remote code with `modeling_pmoe.py`: it imports only torch, transformers and its
siblings.
"""

from collections.abc import Iterable

import torch
from torch import nn

from .experts_pmoe import PMoEExperts, PMoELinear, PMoERouter, expert_index_of


def set_trainable(model, experts: Iterable[int]):
    """The freeze policy of continual training: the LoRA A/B and learned router keys of `experts` train, every other
    expert is frozen; base weights train only with `config.train_base_weights`, except the model's task heads
    (`_trainable_task_heads`, e.g. the classifier's `score`, as PEFT's `modules_to_save`), which always train.

    A function of the model, not a method, so the Trainer callback applies the same policy to a model loaded as remote
    code from an older checkpoint."""
    experts = set(experts)
    heads = tuple(getattr(model, "_trainable_task_heads", ()))
    for name, param in model.named_parameters():
        index = expert_index_of(name)
        if index is not None:
            param.requires_grad_(index in experts)
        else:
            param.requires_grad_(model.config.train_base_weights or name.split(".")[0] in heads)


class PMoEGrowthMixin:
    """Growing, freezing and merging the experts of a PMoE model; mixed into `PMoEPreTrainedModel`, so every head
    (`PMoEModel`, `PMoEForCausalLM`, `PMoEForSequenceClassification`) has it."""

    def _pmoe_model(self):
        """The `PMoEModel` (itself, or the head's `base_model`): it holds the routers and the expert being trained."""
        model = self.base_model
        if not hasattr(model, "routers"):
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

    def expert_routers(self) -> list[PMoERouter]:
        """The routers whose gates drive the experts (one, or one per deep layer); not the screens."""
        return list(self._pmoe_model().routers)

    def _routers_with_keys(self) -> list[PMoERouter]:
        """Every router holding a key per expert: `expert_routers()` and the screens, if any (growth, merging and
        removal change them alike)."""
        return self.expert_routers() + [screen for _, screen in self._pmoe_model()._screens()]

    def expert_parameters(self, index: int) -> dict[str, nn.Parameter]:
        """The parameters of expert `index`: its LoRA A/B in every target of the expert layers, and its learned router
        key/bias (Gaussian keys are buffers: see `expert_tensors`)."""
        if not 0 <= index < self.config.num_experts:
            raise IndexError(f"expert index {index} out of range: the model has {self.config.num_experts} experts.")
        names = {}
        for name, param in self.named_parameters():
            if expert_index_of(name) == index:
                names[name] = param
        return names

    def expert_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """`expert_parameters(index)` plus the expert's buffers (its Gaussian router key statistics)."""
        tensors = dict(self.expert_parameters(index))
        for name, buffer in self.named_buffers():
            if expert_index_of(name) == index:
                tensors[name] = buffer
        return tensors

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that belongs to no expert (embeddings, attention, MLP, norms, LM head)."""
        return {name: param for name, param in self.named_parameters() if expert_index_of(name) is None}

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

    @torch.no_grad()
    def fit_router_key(self, batches: Iterable[dict], expert: int | None = None, missing_screen_keys_only: bool = False
                       ) -> int:
        """Fit the router key of `expert` (default: `training_expert`) on `batches` in one pass without experts, and
        close it: training forwards then add nothing to it and, with experts in every layer, skip the expert-free pass
        that would fit it (about half a forward per training step). The Trainer callback runs this over a sample of
        `router_fit_sequences` of each task's training examples before the task's first step.

        `batches`: dicts of tensors as a data collator gives them: `input_ids`, and optionally `attention_mask`,
        token `labels` (the prompt, labels -100, is what routes a sequence, as in a training forward), `position_ids`
        (packed rows) or `routing_mask`. The features are those the router reads at inference (the input of
        `router_input_layer`, no expert applied), in eval mode (no dropout). Fitted keys (LDA, Gaussian) and one
        router only. The router's decisions on each batch, with the key fitted so far, go to the router logs (load,
        entropy, agreement with `expert`), as when training forwards fit the key. Returns how many sequences (tokens,
        with token routing) were fitted; a key that got none stays open.

        `missing_screen_keys_only=True`: fit only the expert's keys in the screens (`router_screen_margin`) that have
        none yet, from the same kind of batches, and leave its boundary key and the logs as they are: for experts
        trained before a screen existed (older checkpoints), whose screen stays off until every fitted expert has a key
        in it. Fit them on the task's own data, as its boundary key was."""
        config = self.config
        if not config.router_keys_are_fitted or config.router_per_layer:
            raise ValueError(
                "fit_router_key fits the one router's LDA / Gaussian key of an expert; this model has "
                f"router_keys={config.router_keys!r}, router_per_layer={config.router_per_layer} (learned keys train "
                "by gradient, per-layer routers read features that depend on the experts)."
            )
        expert = self.training_expert if expert is None else expert
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < config.num_experts:
            raise IndexError(
                f"fit_router_key needs an expert of this model (it has {config.num_experts}), got {expert!r}."
            )
        model = self._pmoe_model()
        key = model.routers[0].experts[expert]
        screen_keys = [screen.experts[expert] for _, screen in model._screens()]
        fits_screen = [not missing_screen_keys_only or bool(screen_key.count == 0) for screen_key in screen_keys]
        if missing_screen_keys_only:
            if not bool(key.count > 0):
                raise ValueError(
                    f"fit_router_key(missing_screen_keys_only=True): expert {expert}'s router key is not fitted yet; "
                    "fit it first (without missing_screen_keys_only), which fits its screen keys too."
                )
            if not any(fits_screen):
                return 0
        names = ("input_ids", "attention_mask", "labels", "position_ids", "routing_mask")
        was_training, fitted = self.training, 0
        self.eval()
        try:
            for batch in batches:
                if not isinstance(batch.get("input_ids"), torch.Tensor):
                    raise ValueError(
                        f"fit_router_key needs batches with `input_ids` tensors, got keys {sorted(batch)}."
                    )
                features, screen_features = model._expert_free_routing_features(
                    **{name: batch.get(name) for name in names}, to_boundary=not missing_screen_keys_only
                )
                for screen_key, features_read, fits in zip(screen_keys, screen_features, fits_screen):
                    if fits:  # the screens', on the same sequences
                        screen_key.accumulate(features_read)
                if missing_screen_keys_only:
                    fitted += screen_features[0].shape[0]
                    continue
                fitted += features.shape[0]
                key.accumulate(features)
                # The router logs (load, entropy, agreement) see what the router decides with the key fitted so far,
                # as they did when training forwards fitted it.
                model.routers[0].record(model.routers[0](features[:, None, :])[1], forced_expert=expert)
        finally:
            self.train(was_training)
        if not missing_screen_keys_only:
            key.closed = key.closed or fitted > 0
        return fitted

    def freeze_experts(self, indices: Iterable[int] | None = None, frozen: bool = True):
        """Set `requires_grad=not frozen` on the given experts (default: all) and their router entries."""
        indices = set(range(self.config.num_experts) if indices is None else indices)
        for name, param in self.named_parameters():
            if expert_index_of(name) in indices:
                param.requires_grad_(not frozen)

    def set_trainable(self, experts: Iterable[int]):
        """The freeze policy of continual training (`add_expert`, the Trainer callback and resume all use it)."""
        set_trainable(self, experts)

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
        check_new_task(config, task_name, "add_expert")
        index = config.num_experts
        for module in self.expert_modules():
            module.grow_expert()
        reference = self.get_input_embeddings().weight
        for router in self._routers_with_keys():
            router.add_key(reference.device, reference.dtype)
        config.num_experts = index + 1
        config.expert_tasks = [*config.expert_tasks, task_name]
        config.expert_train_steps = [*config.expert_train_steps, 0]
        config.validate_pmoe()
        if init_from is not None:
            self.copy_expert_weights(init_from, index)

        earlier = {} if freeze_previous else {
            param: param.requires_grad for name, param in self.named_parameters()
            if (expert := expert_index_of(name)) is not None and expert != index
        }
        self.set_trainable({index})
        for param, requires_grad in earlier.items():  # freeze_previous=False: earlier experts stay as they were
            param.requires_grad_(requires_grad)
        self.training_expert = index
        return index

    # ------------------------------------------------------------ merging (Park 2024): capping the expert count
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
        first, second, target = merge_choice(config.num_experts, self.training_expert, self.expert_usage(), sources,
                                             target)
        for module in self.expert_modules():
            merge_lora_experts(module, first, second, target, method)
        for router in self._routers_with_keys():
            merge_router_keys(router, first, second, target)
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
        for router in self._routers_with_keys():
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


@torch.no_grad()
def merge_lora_experts(module: PMoEExperts, first: int, second: int, target: int, method: str):
    """Write the merge of experts `first` and `second` of one expert module over expert `target`: the average of the
    LoRA factors, or (`"svd"`) the best rank-r factors of the sum of their updates."""
    a, b = module.experts[first], module.experts[second]
    if method == "average":
        lora_a, lora_b = (a.lora_A + b.lora_A) / 2, (a.lora_B + b.lora_B) / 2
    else:
        lora_a, lora_b = best_low_rank_factors_of_sum(
            [(a.lora_B.float(), a.lora_A.float()), (b.lora_B.float(), b.lora_A.float())], module.rank
        )
    module.experts[target].lora_A.copy_(lora_a)
    module.experts[target].lora_B.copy_(lora_b)


@torch.no_grad()
def merge_router_keys(router: PMoERouter, first: int, second: int, target: int):
    """Key `target` covers both `first` and `second`: fitted statistics are added (the merged Gaussian / LDA class is
    fitted on both tasks' features), learned keys averaged; the usage counts are added."""
    merged, a, b = router.experts[target], router.experts[first], router.experts[second]
    if merged.kind != "learned":
        for name in merged.statistics:
            getattr(merged, name).copy_(getattr(a, name) + getattr(b, name))
    else:
        merged.key.copy_((a.key + b.key) / 2)
        merged.bias.copy_((a.bias + b.bias) / 2)
    router.usage[target] = router.usage[first] + router.usage[second]


def check_new_task(config, task_name, what: str):
    """Refuse, with a `ValueError` that says why, to grow an expert for `task_name` (`what`: who asks): it must be a
    new, non-empty name, and the model must be under `max_experts`."""
    if not isinstance(task_name, str) or not task_name.strip():
        raise ValueError(f"{what} needs a non-empty task name, got {task_name!r}.")
    if task_name in config.expert_tasks:
        raise ValueError(
            f"Task {task_name!r} already has expert {config.expert_tasks.index(task_name)}; "
            f"existing tasks: {config.expert_tasks}. Use a new task name."
        )
    if config.max_experts is not None and config.num_experts >= config.max_experts:
        raise ValueError(
            f"Cannot add expert for {task_name!r}: the model already has max_experts={config.max_experts} experts."
        )


def merge_choice(num_experts: int, training_expert: int | None, usage: torch.Tensor, sources, target):
    """`merge_experts`' `(first, second, target)`: by default the two most used experts and the least used other
    one, never the expert being trained (it is still learning its task); given ones are checked."""
    candidates = [e for e in range(num_experts) if e != training_expert]
    if sources is None:
        if len(candidates) < 3:
            raise ValueError(
                f"merge_experts needs at least 3 experts besides the one being trained to pick two sources and a "
                f"different target; the model has {num_experts} (training expert: {training_expert})."
            )
        ranked = sorted(candidates, key=lambda e: (-usage[e].item(), e))
        sources = (ranked[0], ranked[1])
    first, second = sources
    if first == second or not all(0 <= e < num_experts for e in (first, second)):
        raise ValueError(f"merge_experts: sources must be two different experts in [0, {num_experts}), got {sources}.")
    if target is None:
        targets = [e for e in candidates if e not in (first, second)]
        if not targets:
            raise ValueError("merge_experts: no expert left to overwrite (not a source, not being trained).")
        target = min(targets, key=lambda e: (usage[e].item(), -e))
    if not 0 <= target < num_experts:
        raise ValueError(f"merge_experts: target must be in [0, {num_experts}), got {target}.")
    return first, second, target
