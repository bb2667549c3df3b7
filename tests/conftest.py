"""Shared fixtures: tiny random dense models of every supported family, built in code (no network)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # always: no test may reach the real Hub (subprocesses set their own)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import pmoe


# The files a checkpoint ships as remote code (save_pretrained copies the modeling file and its sibling imports).
REMOTE_CODE_FILES = (
    "configuration_pmoe.py", "experts_pmoe.py", "growth_pmoe.py", "loading_pmoe.py", "modeling_pmoe.py",
)

VOCAB = 97
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)),
    # A short sliding window so the sliding mask really cuts on the test's sequence lengths.
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY, sliding_window=5, head_dim=16)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**TINY, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    ),
}


def make_dense(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    # Random (not zero) biases and norm weights, so the conversion test sees them copied.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.5)
    return model.eval()


def tiny_pmoe_config(**overrides) -> pmoe.PMoEConfig:
    fields = dict(TINY, num_shallow_layers=2, expert_rank=4)
    fields.update(overrides)
    return pmoe.PMoEConfig(**fields)


def make_pmoe(seed: int = 0, **overrides) -> pmoe.PMoEForCausalLM:
    torch.manual_seed(seed)
    return pmoe.PMoEForCausalLM(tiny_pmoe_config(**overrides)).eval()


# The paper's setting: per-token routing with router keys learned by gradient descent.
TOKEN_LEARNED = dict(routing="token", router_keys="learned")


def randomize_experts(model, indices=None, seed: int = 1):
    """Give experts and router keys values as training would (LoRA weights, learned keys, or fitted Gaussian keys),
    so growth and routing tests are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    indices = range(model.config.num_experts) if indices is None else indices
    with torch.no_grad():
        for index in indices:
            for name, tensor in model.expert_tensors(index).items():
                if name.endswith(("lora_A", "lora_B", ".key", ".bias")):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
            for router in model.expert_routers():
                entry = router.experts[index]
                if entry.kind == "lda":  # 10 samples around a random mean: a fitted key
                    size = entry.feature_sum.shape[0]
                    mean = torch.randn(size, generator=generator, dtype=torch.float64) * 0.5
                    samples = mean + torch.randn(10, size, generator=generator, dtype=torch.float64) * 0.8
                    entry.count.fill_(10.0)
                    entry.feature_sum.copy_(samples.sum(0))
                    entry.feature_outer_sum.copy_(samples.T @ samples)
                if entry.kind == "gaussian":
                    count = 10.0
                    mean = torch.randn(entry.feature_sum.shape, generator=generator) * 0.5
                    variance = torch.rand(entry.feature_sum.shape, generator=generator) + 0.5
                    entry.count.fill_(count)
                    entry.feature_sum.copy_(mean * count)
                    entry.feature_sq_sum.copy_((variance + mean.square()) * count)


def padded_batch(batch: int = 3, length: int = 9, seed: int = 0, side: str = "left"):
    """Random ids with an attention mask; row i has i padding tokens on the given side."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        pad = min(row, length - 1)
        if pad:
            if side == "left":
                attention_mask[row, :pad] = 0
                input_ids[row, :pad] = TINY["pad_token_id"]
            else:
                attention_mask[row, -pad:] = 0
                input_ids[row, -pad:] = TINY["pad_token_id"]
    return input_ids, attention_mask


@pytest.fixture
def tiny_model():
    return make_pmoe()
