import pytest
import torch
import torch.nn.functional as F

from pmoe import PMoEConfig, PMoEEmbedding, PMoEForCausalLM, PMoELinear, PMoEModel
from pmoe.configuration_pmoe import EXPERT_TARGET_MODULES
from pmoe.experts_pmoe import expert_rank_gates, route
from transformers import PreTrainedModel

from helpers import TINY, TOKEN_LEARNED, VOCAB, make_pmoe, padded_batch, randomize_experts, tiny_pmoe_config

PROJECTIONS = list(EXPERT_TARGET_MODULES)


def logits_of(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


# --------------------------------------------------------------------------------- structure
def test_experts_live_only_in_the_deep_targets():
    model = make_pmoe(num_shallow_layers=1, expert_target_modules=["q_proj", "down_proj"], **TOKEN_LEARNED)
    model.add_expert("a")
    names = [name for name in model.state_dict() if ".experts." in name and name.startswith("model.layers.")]
    assert names  # one lora_A and one lora_B per deep target
    assert {name.split(".")[2] for name in names} == {"1", "2", "3"}
    assert {name.split(".")[4] for name in names} == {"q_proj", "down_proj"}
    assert "model.layers.1.self_attn.q_proj.experts.0.lora_A" in names
    assert "model.layers.3.mlp.down_proj.experts.0.lora_B" in names
    assert "model.routers.0.experts.0.key" in model.state_dict()
    assert len(model.expert_linears()) == 3 * 2


@pytest.mark.parametrize("keys", ["learned", "gaussian", "lda"])
def test_a_fresh_model_is_a_plain_trainable_transformers_model(keys):
    model = make_pmoe(num_experts=2, expert_tasks=["a", "b"], router_keys=keys)
    # Freezing belongs to the growth API: construction leaves everything trainable.
    assert all(param.requires_grad for param in model.parameters())
    for linear in model.expert_linears():
        for expert in linear.experts:
            assert torch.count_nonzero(expert.lora_B) == 0
            assert torch.count_nonzero(expert.lora_A) > 0
    for router in model.expert_routers():
        for entry in router.experts:
            assert all(torch.count_nonzero(tensor) == 0 for tensor in [*entry.parameters(), *entry.buffers()])


# LDA keys: 3 statistics in the boundary router and 3 in each screen's (embedding, first layer).
@pytest.mark.parametrize("keys, router_tensors", [("learned", 2), ("gaussian", 3), ("lda", 9)])
def test_every_parameter_is_initialised_from_the_meta_device(tmp_path, keys, router_tensors):
    # from_pretrained builds on the meta device and materialises what the checkpoint lacks via _init_weights.
    config = tiny_pmoe_config(num_experts=2, expert_tasks=["a", "b"], router_keys=keys)
    model = PMoEForCausalLM._from_config(config)
    expert_keys = {k for k in model.state_dict() if ".experts." in k}
    assert len(expert_keys) == 2 * ((4 * 7 + 1) * 2 + router_tensors)  # all 4 layers and the embedding (default)
    state = {k: v for k, v in model.state_dict().items() if k not in expert_keys}
    model.save_pretrained(tmp_path, state_dict=state)
    # pmoe's from_pretrained refuses a checkpoint without its experts (tests/test_bad_checkpoints.py); transformers'
    # own loader underneath it initialises them, which is what this test checks.
    with pytest.raises(ValueError, match="none of its .* tensors is in the weights"):
        PMoEForCausalLM.from_pretrained(tmp_path)
    loaded, info = PreTrainedModel.from_pretrained.__func__(PMoEForCausalLM, tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == expert_keys
    for name, param in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert torch.isfinite(param).all(), name
        if name.startswith("model.embed_tokens.experts."):  # PEFT's embedding init: A zero, B normal
            assert (torch.count_nonzero(param) == 0) == name.endswith("lora_A"), name
            continue
        if name.endswith("lora_B") or ".routers." in name or ".screen_router." in name:
            assert torch.count_nonzero(param) == 0, name
        if name.endswith("lora_A"):
            assert param.abs().max() > 0, name
            bound = 1 / param.shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in
            assert param.abs().max() <= bound + 1e-6, name


# --------------------------------------------------------------------------------- growth
def test_add_expert_records_tasks_and_returns_indices():
    model = make_pmoe()
    assert model.add_expert("sql") == 0
    assert model.add_expert("chat") == 1
    assert model.config.num_experts == 2
    assert model.config.expert_tasks == ["sql", "chat"]
    assert model.model.config is model.config


def test_requires_grad_after_each_growth():
    model = make_pmoe(router_per_layer=True, **TOKEN_LEARNED)
    base_names = set(model.base_parameters())
    for step, task in enumerate(["a", "b", "c"]):
        model.add_expert(task)
        assert all(not model.get_parameter(name).requires_grad for name in base_names), task
        for index in range(step + 1):
            params = model.expert_parameters(index)
            # LoRA A+B in 2 deep layers x 7 targets, key+bias in 2 per-layer routers
            assert len(params) == 2 * 7 * 2 + 2 * 2
            assert all(p.requires_grad == (index == step) for p in params.values()), (task, index)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.expert_parameters(2))


def test_growth_options_keep_previous_or_base_trainable():
    model = make_pmoe(train_base_weights=True)
    model.add_expert("a")
    model.add_expert("b", freeze_previous=False)
    assert all(p.requires_grad for p in model.parameters())

    model = make_pmoe()
    model.add_expert("a")
    model.freeze_experts([0], frozen=False)
    model.add_expert("b", freeze_previous=False)
    assert all(p.requires_grad for p in model.expert_parameters(0).values())
    assert not any(p.requires_grad for p in model.base_parameters().values())


@pytest.mark.parametrize("router_keys", ["lda", "gaussian"])
def test_expert_started_from_an_earlier_one_is_a_copy_and_changes_nothing(router_keys):
    model = make_pmoe(router_keys=router_keys)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    input_ids, attention_mask = padded_batch()
    before = logits_of(model, input_ids, attention_mask)
    assert model.add_expert("c", init_from=0) == 2
    assert torch.equal(logits_of(model, input_ids, attention_mask), before)  # its key is not fitted yet
    for linear in model.expert_linears():
        new, source = linear.experts[2], linear.experts[0]
        assert torch.equal(new.lora_A, source.lora_A) and torch.equal(new.lora_B, source.lora_B)
        assert new.lora_A.data_ptr() != source.lora_A.data_ptr()  # a copy: training it leaves expert 0 as it is
    assert all(p.requires_grad for p in model.expert_parameters(2).values())
    assert not any(p.requires_grad for p in model.expert_parameters(0).values())


def test_expert_start_from_a_bad_source_is_refused_before_growing():
    model = make_pmoe()
    model.add_expert("a")
    for bad in (1, -1, True, "a"):
        with pytest.raises(IndexError, match="init_from"):
            model.add_expert("b", init_from=bad)
    assert model.config.num_experts == 1 and len(model.expert_linears()[0].experts) == 1
    learned = make_pmoe(**TOKEN_LEARNED)
    learned.add_expert("a")
    with pytest.raises(ValueError, match="fitted router keys"):
        learned.add_expert("b", init_from=0)
    assert learned.config.num_experts == 1


def test_growth_from_untrained_experts_is_exact():
    model = make_pmoe()
    input_ids, attention_mask = padded_batch()
    before = logits_of(model, input_ids, attention_mask)
    model.add_expert("a")
    model.add_expert("b")
    assert torch.equal(logits_of(model, input_ids, attention_mask), before)


@pytest.mark.parametrize(
    "routing", [{}, {"router_top_k": 1}, TOKEN_LEARNED, dict(TOKEN_LEARNED, router_per_layer=True)],
    ids=["sequence-gaussian", "sequence-gaussian-top1", "token-learned", "token-learned-per-layer"],
)
def test_growth_after_training_leaves_outputs_unchanged(routing):
    model = make_pmoe(**routing)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)  # as if both tasks had been trained
    input_ids, attention_mask = padded_batch()
    before = logits_of(model, input_ids, attention_mask)
    assert not torch.equal(before, logits_of(make_pmoe(), input_ids, attention_mask))  # experts do act
    model.add_expert("c")
    after = logits_of(model, input_ids, attention_mask)
    if model.config.router_keys != "learned":
        # An unfitted key's gate is exactly 0, so the new expert is not even computed: bit-identical.
        assert torch.equal(after, before)
    else:
        # Sigmoid gates are independent and the new LoRA B is zero: unchanged up to float32 summation order (the
        # concatenated matmul of 3 experts sums in another order than that of 2).
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_softmax_gates_renormalise_when_an_expert_is_added():
    # Documented trade-off: softmax shares each token's gate mass, so growth moves old outputs.
    model = make_pmoe(router_activation="softmax", **TOKEN_LEARNED)
    model.add_expert("a")
    randomize_experts(model)
    input_ids, attention_mask = padded_batch()
    before = logits_of(model, input_ids, attention_mask)
    model.add_expert("b")
    assert (logits_of(model, input_ids, attention_mask) - before).abs().max() > 1e-3


def test_bad_growth_requests_are_refused_without_changes():
    model = make_pmoe(max_experts=2)
    model.add_expert("a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already has expert 0"):
        model.add_expert("a")
    with pytest.raises(ValueError, match="non-empty task name"):
        model.add_expert("  ")
    model.add_expert("b")
    with pytest.raises(ValueError, match="max_experts=2"):
        model.add_expert("c")
    assert model.config.expert_tasks == ["a", "b"]
    assert set(model.state_dict()) == set(state) | set(model.expert_tensors(1))
    with pytest.raises(IndexError, match="2 experts"):
        model.expert_parameters(2)


def test_training_step_changes_only_the_new_expert():
    model = make_pmoe()
    model.add_expert("a")
    randomize_experts(model)
    model.add_expert("b")
    model.train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    old_key_sum = model.model.routers[0].experts[0].feature_sum.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    input_ids, attention_mask = padded_batch()
    for _ in range(3):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert torch.equal(model.model.routers[0].experts[0].feature_sum, old_key_sum)  # old key's statistics too
    assert model.model.routers[0].experts[1].count > 0  # the new key was fitted from the task's batches
    new = model.expert_parameters(1)
    assert any(torch.count_nonzero(p) for n, p in new.items() if n.endswith("lora_B"))


# --------------------------------------------------------------------------------- expert layer and router
def trained_expert_linear(num_experts, bias):
    """A 32 -> 24 `PMoELinear` with `num_experts` rank-4 experts whose B is non-zero, as after training."""
    config = tiny_pmoe_config(num_experts=num_experts, expert_tasks=[f"t{i}" for i in range(num_experts)],
                              expert_rank=4)
    torch.manual_seed(0)
    linear = PMoELinear(32, 24, bias, config, with_experts=True)
    for expert in linear.experts:
        torch.nn.init.normal_(expert.lora_B)
    return config, linear


def test_expert_linear_matches_a_per_expert_reference():
    config, linear = trained_expert_linear(3, bias=True)
    x = torch.randn(2, 5, 32)
    gates = torch.rand(2, 5, 3)
    expected = F.linear(x, linear.weight, linear.bias)
    for e, expert in enumerate(linear.experts):
        delta = x @ expert.lora_A.T @ expert.lora_B.T
        expected = expected + config.expert_scaling * gates[..., e : e + 1] * delta
    torch.testing.assert_close(linear(x, gates), expected, rtol=1e-5, atol=1e-5)
    # No gate: base weights only, never "all experts at weight 1".
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    with pytest.raises(ValueError, match="gates for 2 experts but has 3"):
        linear(x, gates[..., :2])


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_top_k_keeps_exactly_k_experts_per_token(activation):
    logits = torch.randn(4, 6, 5)
    gates = route(logits, activation, top_k=2)
    assert ((gates > 0).sum(-1) == 2).all()
    chosen = gates.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(chosen, logits.topk(2, dim=-1).indices.sort(-1).values)
    if activation == "softmax":
        torch.testing.assert_close(gates.sum(-1), torch.ones(4, 6))
    else:
        torch.testing.assert_close(gates[gates > 0], torch.sigmoid(logits)[gates > 0])
    dense = route(logits, activation, top_k=None)
    assert (dense > 0).all()
    assert torch.equal(route(logits, activation, top_k=0), dense)
    assert torch.equal(route(logits, activation, top_k=9), dense)  # fewer experts than k: all of them


@pytest.mark.parametrize("top_k", [None, 3])
def test_min_gate_drops_experts_far_below_the_best_and_renormalises(top_k):
    logits = torch.randn(4, 6, 5) * 3
    gates = route(logits, "softmax", top_k, min_gate=0.1)
    dense = route(logits, "softmax", top_k)
    kept = dense >= 0.1 * dense.amax(-1, keepdim=True)
    assert torch.equal(gates > 0, kept)
    torch.testing.assert_close(gates, torch.softmax(logits.masked_fill(~kept, float("-inf")), -1))
    assert torch.equal(route(logits, "softmax", top_k, min_gate=0.0), dense)
    # Sigmoid gates are independent per expert: no floor.
    assert torch.equal(route(logits, "sigmoid", None, min_gate=0.5), torch.sigmoid(logits))
    # A row whose experts are all unfitted (-inf) still gets no expert.
    assert not route(torch.full((1, 3), float("-inf")), "softmax", None, min_gate=0.1).any()


def test_router_temperature_sharpens_gates():
    model = make_pmoe(router_temperature=0.1, num_experts=2, expert_tasks=["a", "b"], **TOKEN_LEARNED)
    router = model.expert_routers()[0]
    with torch.no_grad():
        router.experts[0].key.normal_()
    hidden = torch.randn(1, 3, 32)
    logits, _ = router(router.features(hidden, None)[0])
    features = F.rms_norm(hidden, (32,), eps=model.config.rms_norm_eps)
    torch.testing.assert_close(logits[..., 0], (features @ router.experts[0].key) / 0.1)


def test_router_logits_and_load_balancing_loss():
    model = make_pmoe(router_top_k=1, router_aux_loss_coef=0.5, **TOKEN_LEARNED)
    input_ids, attention_mask = padded_batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    assert out.router_logits is None and out.aux_loss is None  # no experts yet
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    plain = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 1
    assert out.router_logits[0].shape == (input_ids.numel(), 2)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.aux_loss)

    per_layer = make_pmoe(router_per_layer=True, num_shallow_layers=1, **TOKEN_LEARNED)
    per_layer.add_expert("a")
    out = per_layer(input_ids=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 3  # one router per deep layer

    # Gaussian keys have nothing to balance: logits (one row per sequence), no auxiliary loss.
    gaussian = make_pmoe(router_aux_loss_coef=0.5)
    gaussian.add_expert("a")
    randomize_experts(gaussian)
    out = gaussian(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, output_router_logits=True)
    assert out.router_logits[0].shape == (input_ids.shape[0], 1)
    assert out.aux_loss is None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    def gradients(checkpointing):
        model = make_pmoe(**TOKEN_LEARNED)
        model.add_expert("a")
        randomize_experts(model)
        model.add_expert("b")
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        input_ids, attention_mask = padded_batch()
        model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(".routers." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_custom_4d_mask_and_inputs_embeds():
    model = make_pmoe(expert_target_modules=PROJECTIONS)  # embedding experts need ids (next test)
    model.add_expert("a")
    randomize_experts(model)
    input_ids, attention_mask = padded_batch(batch=1, length=6)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        embeds = model.get_input_embeddings()(input_ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected)
        causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
        mask_4d = torch.zeros(1, 1, 6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask_4d).logits, expected)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=input_ids, inputs_embeds=embeds)


# --------------------------------------------------------------------------------- embedding experts
def test_embedding_experts_are_peft_embedding_loras_gated_like_the_layers():
    model = make_pmoe()  # the default targets the embedding too
    assert model.config.expert_embeddings and isinstance(model.get_input_embeddings(), PMoEEmbedding)
    input_ids, attention_mask = padded_batch()
    before = logits_of(model, input_ids, attention_mask)
    model.add_expert("a")
    model.add_expert("b")
    embedding = model.get_input_embeddings()
    expert = embedding.experts[1]
    assert expert.lora_A.shape == (4, VOCAB) and expert.lora_B.shape == (TINY["hidden_size"], 4)
    assert torch.count_nonzero(expert.lora_A) == 0 and torch.count_nonzero(expert.lora_B) > 0
    assert torch.equal(logits_of(model, input_ids, attention_mask), before)  # growth changes nothing
    assert {name for name in model.expert_parameters(1) if "embed_tokens" in name} == {
        "model.embed_tokens.experts.1.lora_A", "model.embed_tokens.experts.1.lora_B"}
    randomize_experts(model)
    # What enters layer 0 is the ids' embeddings plus the gated update scaling * B_e A_e[:, id], as PEFT computes it.
    entering = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: entering.append(args[0]))
    with torch.no_grad():
        for gates in ([0.25, 0.75], [0.0, 0.0]):
            model(input_ids=input_ids, attention_mask=attention_mask, routing_weights=torch.tensor([gates] * 3))
            expected = embedding.weight[input_ids] + sum(
                g * model.config.expert_scaling * F.embedding(input_ids, e.lora_A.T) @ e.lora_B.T
                for g, e in zip(gates, embedding.experts)
            )
            torch.testing.assert_close(entering.pop(), expected, rtol=1e-6, atol=1e-6)
    hook.remove()


def test_inputs_embeds_are_refused_by_embedding_experts_unless_no_expert_is_gated():
    model = make_pmoe()
    input_ids, attention_mask = padded_batch()
    embeds = model.get_input_embeddings()(input_ids)
    model(inputs_embeds=embeds, attention_mask=attention_mask)  # no experts yet: fine
    model.add_expert("a")
    randomize_experts(model)
    with pytest.raises(ValueError, match=r"embedding experts .* look up token ids.* Pass `input_ids`"):
        model(inputs_embeds=embeds, attention_mask=attention_mask)
    with torch.no_grad():  # an all-zero gate is the base model, which inputs_embeds can compute
        torch.testing.assert_close(
            model(inputs_embeds=embeds, attention_mask=attention_mask, routing_weights=torch.zeros(3, 1)).logits,
            model(input_ids=input_ids, attention_mask=attention_mask, routing_weights=torch.zeros(3, 1)).logits,
        )


def test_resizing_the_vocabulary_keeps_embedding_experts_and_outputs():
    model = make_pmoe()
    model.add_expert("a")
    randomize_experts(model)
    input_ids, attention_mask = padded_batch()
    before = logits_of(model, input_ids, attention_mask)
    model.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    expert = model.get_input_embeddings().experts[0]
    assert expert.lora_A.shape == (4, VOCAB + 5) and torch.count_nonzero(expert.lora_A[:, VOCAB:]) == 0
    torch.testing.assert_close(logits_of(model, input_ids, attention_mask)[..., :VOCAB], before)
    model(input_ids=torch.tensor([[VOCAB + 4, 1]]))  # a new token routes and looks up its (zero) expert column
    model.add_expert("b")
    assert model.get_input_embeddings().experts[1].lora_A.shape == (4, VOCAB + 5)


@pytest.mark.parametrize("keys", ["learned", "gaussian", "lda"])
def test_bfloat16_forward_and_backward(keys):
    model = make_pmoe(router_keys=keys).to(torch.bfloat16)
    model.add_expert("a")
    randomize_experts(model)
    model.add_expert("b")
    model.train()
    entry = model.model.routers[0].experts[0]
    if keys == "learned":
        assert entry.key.dtype == torch.bfloat16
    else:  # fitted keys' statistics are never rounded to bf16 (Gaussian: float32, LDA: float64)
        assert entry.feature_sum.dtype == (torch.float64 if keys == "lda" else torch.float32)
        assert entry.feature_sum.dtype == model.to(torch.bfloat16).model.routers[0].experts[0].feature_sum.dtype
    input_ids, attention_mask = padded_batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert model.model.layers[3].mlp.down_proj.experts[1].lora_B.grad is not None


def test_auto_classes_are_registered():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    fields = {k: v for k, v in tiny_pmoe_config().to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("pmoe", **fields)
    assert isinstance(config, PMoEConfig)
    assert isinstance(AutoModel.from_config(config), PMoEModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), PMoEForCausalLM)


def test_only_active_experts_are_computed_and_the_result_is_the_same():
    _, linear = trained_expert_linear(4, bias=False)
    x = torch.randn(2, 5, 32)
    gates = torch.zeros(2, 1, 4)
    gates[0, 0, 1], gates[1, 0, 3] = 0.7, 1.0
    with torch.no_grad():
        full = linear(x, gates)
        sparse = linear(x, gates, active_experts=(1, 3))
        torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-5)
        # The active experts' gates only, or (what the model passes, worked out once per forward) their rank gates:
        # the same result, bit for bit.
        assert torch.equal(linear(x, gates[..., [1, 3]], active_experts=(1, 3)), sparse)
        rank_gates = expert_rank_gates(gates[..., [1, 3]], linear.rank, linear.scaling, x.dtype)
        assert rank_gates.shape == (2, 1, 2 * linear.rank)
        assert torch.equal(linear(x, rank_gates=rank_gates, active_experts=(1, 3)), sparse)
        with pytest.raises(ValueError, match=r"rank gates for 8 columns but its active experts have 4 \(rank 4\)"):
            linear(x, rank_gates=rank_gates, active_experts=(1,))
        assert torch.equal(linear(x, gates, active_experts=()), F.linear(x, linear.weight))
        with pytest.raises(ValueError, match="gates for 3 experts but has 4 experts and 2 active ones"):
            linear(x, gates[..., :3], active_experts=(1, 3))
        # The inference-time concatenation cache notices in-place changes of the experts.
        linear.experts[3].lora_B.add_(1.0)
        changed = linear(x, gates, active_experts=(1, 3))
    reference = linear(x, gates)  # with autograd: no cache
    torch.testing.assert_close(changed, reference.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, sparse)


def test_a_module_grows_one_expert_and_the_old_name_still_works():
    _, linear = trained_expert_linear(2, bias=False)
    x = torch.randn(2, 3, 32)
    gates = torch.tensor([0.25, 0.75]).expand(2, 1, 2)
    with torch.no_grad():
        before = linear(x, gates)
        new = linear.grow_expert()
        assert len(linear.experts) == 3 and torch.equal(new.lora_B, torch.zeros_like(new.lora_B))
        # A zero-B expert adds nothing, whatever its gate.
        torch.testing.assert_close(linear(x, torch.cat([gates, torch.ones(2, 1, 1)], dim=-1)), before)
        linear.add_expert()  # the deprecated name of grow_expert
    assert len(linear.experts) == 4
