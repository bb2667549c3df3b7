"""Shared builders and helpers of the test suite (imported by the test modules and the helper processes; no test
module imports another): tiny random dense models of every supported family, tiny PMoE models, toy tasks as tensors
and `datasets`, Trainer arguments, and the environment of a client process for the fake Hub."""

import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap

import torch
from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    TrainingArguments,
)

import pmoe


def numerics_machine() -> str:
    """What float32 rounding depends on besides the code and the torch version: the kernels torch and MKL pick for
    this CPU by its vector and matrix extensions (the same math gave other bits on an AVX-512 + AMX machine than on
    the one the old-checkpoint fixtures were made on)."""
    flags = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    extensions = sorted(flag for flag in flags if flag.startswith(("avx", "amx", "fma", "f16c")))
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), *extensions])


def numerics_machine_key() -> str:
    """A short name for `numerics_machine()`, for file names."""
    return hashlib.sha256(numerics_machine().encode()).hexdigest()[:12]


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


def task_batch(task: int, batch: int = 8, length: int = 16, seed: int = 0):
    """Sequences whose prompt (first half) draws tokens from the task's own 8 tokens of the vocabulary."""
    generator = torch.Generator().manual_seed(seed * 100 + task)
    low = 3 + task * (VOCAB - 3) // 4
    input_ids = torch.randint(low, low + 8, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return input_ids, labels


def fit_task(model, index, task, batches=4):
    """What training a task does to its Gaussian key: forward its batches in train mode with the expert selected."""
    model.train()
    model.training_expert = index
    with torch.no_grad():
        for seed in range(batches):
            input_ids, labels = task_batch(task, seed=seed)
            model(input_ids=input_ids, labels=labels)
    model.eval()


def task_dataset(task: int, examples: int = 16, length: int = 12) -> Dataset:
    """A toy task: copy a prompt drawn from the task's own 8 tokens (answer = prompt shifted by the task id)."""
    generator = torch.Generator().manual_seed(task)
    low = 3 + task * 20
    prompt = torch.randint(low, low + 8, (examples, length // 2), generator=generator)
    answer = (prompt + task) % TINY["vocab_size"]
    input_ids = torch.cat([prompt, answer], dim=1)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return Dataset.from_dict({
        "input_ids": input_ids.tolist(),
        "attention_mask": torch.ones_like(input_ids).tolist(),
        "labels": labels.tolist(),
        "task": [f"task-{task}"] * examples,
    })


def training_args(output_dir, **overrides):
    fields = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def without_task(dataset):
    return dataset.remove_columns("task")


def client_env(server, home) -> dict:
    """Environment of a client process of the fake Hub `server` (`processes/hub_server.py`). huggingface_hub reads
    these at import time, hence the subprocesses."""
    env = dict(os.environ)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_TOKEN_PATH"):
        env.pop(name, None)
    env.update(
        HF_ENDPOINT=server.url,
        HF_TOKEN="hf_fake",
        HF_HUB_OFFLINE="0",  # conftest sets HF_HUB_OFFLINE=1 for the test process itself
        TRANSFORMERS_OFFLINE="0",
        HF_HOME=str(home),  # fresh cache: every file really comes over HTTP
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",  # hf_xet is installed: without this upload_folder takes the Xet pipeline
        NO_PROXY=",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    )
    return env


def run_client(code: str, env: dict, *args) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def greedy_by_recomputation(model, input_ids, attention_mask, steps):
    """Reference decoding: the full sequence through the model at every step, no cache; with sequence routing, the
    gate computed from the prompt is reused at every step."""
    ids, mask, routing_weights = input_ids, attention_mask, None
    with torch.no_grad():
        for _ in range(steps):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                routing_weights=routing_weights,
            )
            logits = out.logits
            routing_weights = out.routing_weights if routing_weights is None else routing_weights
            next_logits = logits[:, -1].clone()
            next_logits[:, model.config.eos_token_id] = float("-inf")  # as generate's min_new_tokens does
            next_token = next_logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=-1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=-1)
    return ids


def grown_pmoe(num_experts=2, **overrides):
    """A tiny PMoE with `num_experts` experts whose keys are fitted on their toy tasks: all but the last look trained,
    the last one is being trained."""
    model = make_pmoe(**overrides)
    for task in range(num_experts):
        model.add_expert(f"task-{task}")
        fit_task(model, task, task)
    randomize_experts(model, indices=range(num_experts - 1))
    model.training_expert = num_experts - 1
    return model


def screened_model(tasks=3, **overrides):
    """Experts on the toy tasks (each prompt draws from its task's own tokens), LoRA weights as if trained, both keys
    of every expert fitted by `fit_router_key` on the task's batches, as the Trainer callback fits them."""
    model = make_pmoe(**overrides)
    for task in range(tasks):
        model.add_expert(f"task-{task}")
        randomize_experts(model, indices=[task], seed=task + 3)
        for statistic in model.model.routers[0].experts[task].statistics:  # keys only from the task's own prompts
            getattr(model.model.routers[0].experts[task], statistic).zero_()
        model.fit_router_key(
            [{"input_ids": ids, "labels": labels} for ids, labels in (task_batch(task, seed=s) for s in range(4))]
        )
    return model.eval()
