"""PMoEForSequenceClassification and pMoE's prioritized (expert-choice) routing."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import pmoe
from pmoe.experts_pmoe import expert_choice_route, route

from helpers import make_dense, padded_batch, randomize_experts, tiny_pmoe_config


EXPERT_CHOICE = dict(routing="expert_choice", num_labels=3)


def classifier(num_experts=3, seed=0, **overrides):
    torch.manual_seed(seed)
    model = pmoe.PMoEForSequenceClassification(tiny_pmoe_config(**{**EXPERT_CHOICE, **overrides}))
    for index in range(num_experts):
        model.add_expert(f"task-{index}")
    randomize_experts(model)
    return model.eval()


def test_expert_choice_defaults_to_learned_keys_and_validates_its_fields():
    config = tiny_pmoe_config(routing="expert_choice")
    assert config.router_keys == "learned" and config.router_activation == "sigmoid"
    assert tiny_pmoe_config().router_keys == "lda"
    with pytest.raises(ValueError, match=r"PMoEConfig.expert_capacity must be None unless routing='expert_choice'"):
        tiny_pmoe_config(expert_capacity=2)
    for bad in (0, 1.5, -0.1, True, "4"):
        with pytest.raises(ValueError, match=r"PMoEConfig.expert_capacity must be an integer >= 1"):
            tiny_pmoe_config(routing="expert_choice", expert_capacity=bad)
    with pytest.raises(ValueError, match=r"PMoEConfig.router_top_k must be None with routing='expert_choice'"):
        tiny_pmoe_config(routing="expert_choice", router_top_k=1)


def test_causal_lm_refuses_expert_choice_routing():
    message = r"PMoEForCausalLM cannot use routing='expert_choice'.*later tokens"
    with pytest.raises(ValueError, match=message):
        pmoe.PMoEForCausalLM(tiny_pmoe_config(routing="expert_choice"))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config(tiny_pmoe_config(routing="expert_choice"))
    with pytest.raises(ValueError, match=message):
        pmoe.PMoEForCausalLM.from_dense(make_dense("llama"), routing="expert_choice")


@pytest.mark.parametrize("capacity", [None, 2, 0.5, 100])
def test_every_expert_takes_at_most_its_capacity_of_non_padding_tokens(capacity):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 4, generator=generator)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    gates = expert_choice_route(logits, "softmax", capacity, mask)
    valid = mask.sum(1)
    expected = {None: (valid + 3) // 4, 2: torch.full_like(valid, 2), 0.5: torch.ceil(valid * 0.5).long(),
                100: valid}[capacity]
    chosen = gates.ne(0)
    assert torch.equal(chosen.sum(dim=1), expected[:, None].expand(3, 4))  # exactly the capacity (capped)
    assert not chosen[mask == 0].any()  # padding is never selected
    # The chosen tokens are each expert's best: every kept probability >= every dropped one.
    probabilities = route(logits, "softmax", None)  # the router's softmax (summed expert by expert)
    for row in range(3):
        for expert in range(4):
            kept = probabilities[row, :, expert][chosen[row, :, expert]]
            dropped = probabilities[row, :, expert][~chosen[row, :, expert] & mask[row].bool()]
            if len(kept) and len(dropped):
                assert kept.min() >= dropped.max()
    assert torch.equal(gates[chosen], probabilities[chosen])  # a kept token's gate is its probability


@pytest.mark.parametrize("overrides", [{}, {"expert_capacity": 2}, {"router_per_layer": True},
                                       {"router_keys": "gaussian"}, {"routing": "sequence"},
                                       {"routing": "token", "router_keys": "learned"}],
                         ids=["expert-choice", "capacity-2", "per-layer", "gaussian-keys", "sequence", "token"])
def test_shapes_loss_and_padding_does_not_change_a_row(overrides):
    model = classifier(**overrides)
    input_ids, attention_mask = padded_batch(batch=3, length=9, side="left")
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        alone = model(input_ids=input_ids[2:, 2:], attention_mask=attention_mask[2:, 2:]).logits
    assert out.logits.shape == (3, 3)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # Row 2 has two padding tokens: padding is never routed nor pooled, so the row scores as if unpadded.
    torch.testing.assert_close(out.logits[2:], alone, atol=1e-5, rtol=1e-5)


def test_right_padding_pools_the_last_real_token():
    model = classifier()
    input_ids, attention_mask = padded_batch(batch=3, length=9, side="right")
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask).logits
        alone = model(input_ids=input_ids[2:, :7], attention_mask=attention_mask[2:, :7]).logits
    torch.testing.assert_close(batched[2:], alone, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_new_expert_and_its_router_key_only():
    model = classifier(num_experts=2)
    model.add_expert("new")  # freezes experts 0 and 1
    with torch.no_grad():
        for name, tensor in model.expert_tensors(2).items():
            if name.endswith("lora_B"):
                tensor.normal_(0, 0.1)  # so lora_A gets a gradient too
    model.train()
    input_ids, attention_mask = padded_batch(batch=4, length=9, side="left")
    model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    # The first deep layer and the router key: every token there reaches the pooled one. (In the last layer only the
    # pooled token's own q/o/MLP matter, and expert choice may leave that token to other experts.)
    new = {name: param for name, param in model.expert_parameters(2).items()
           if "layers.2." in name or name.endswith((".key", ".bias"))}
    assert len(new) == 2 * 7 + 2
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in new.values()), [
        name for name, param in new.items() if param.grad is None or param.grad.abs().sum() == 0
    ]
    for index in (0, 1):
        assert all(param.grad is None for param in model.expert_parameters(index).values())
    assert model.score.weight.grad is not None  # the head trains with the new task


def test_auto_class_and_save_load_round_trip(tmp_path):
    model = classifier()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, pmoe.PMoEForSequenceClassification)
    assert loaded.config.auto_map["AutoModelForSequenceClassification"] == (
        "modeling_pmoe.PMoEForSequenceClassification"
    )
    input_ids, attention_mask = padded_batch(batch=2, length=7)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        got = loaded(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(got, expected)
