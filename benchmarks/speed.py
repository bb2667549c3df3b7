#!/usr/bin/env python
"""Speed and memory of PMoE against its peers, measured in one process on the same shapes.

Peers: `LlamaForCausalLM` with the same weights (the floor: PMoE without experts is that model), PEFT LoRA on every
layer with the same rank and targets, and full fine-tuning. For prefill and decode, PMoE and PEFT LoRA compute with
the Llama's own weight tensors (`share_base_weights`), so the models compared read the same memory.

- prefill (a forward over the prompt, filling the KV cache; timed with every token's logits, and with the last one's
  only as `generate` runs it) and per-token decode (one token at a time with the cache; the median step, Llama and
  the model taking turns at every step):
  PMoE with 1, 8 and 50 experts with default settings, the prompt routed as real prompts are (keys fitted on
  distinct synthetic tasks: the router picks one expert, and with experts in every layer the embedding screen is
  sure of it), the worst case (identical keys: every expert gets an equal gate and is computed), and with experts in
  every layer a prompt the embedding screen leaves to the first-layer screen (`-first-layer-screen`) and one no
  screen routes (`-unscreened`), against Llama;
- one training step (forward + backward + AdamW step): PMoE training its newest expert as the Trainer callback trains
  it (`pmoe`: the task's key was fitted in one pass before its first step, so no step runs the expert-free pass;
  `pmoe-fitting-in-steps`: a training loop without the callback, whose first `router_fit_sequences` sequences fit the
  key inside the steps), PEFT LoRA, full fine-tuning; and that key-fitting pass (`fit_router_key`), per sequence;
- peak memory of each case (CPU: peak resident set, reset before each case; CUDA: peak allocated), and parameters /
  checkpoint bytes added per task;
- with experts in every layer, prefill over the real-text benchmark's prompts: the three routed cases' ratios weighted
  by the share of those prompts each stage routed (`--routing-results`, `cl_benchmark.py --routing-only` results):
  computed from the timings, not timed on real text.

Timings are medians over repeats after warm-up; prefill and training ratios are the median over the repeats of the
time against the peer's in the same repeat (decode: the ratio of the medians of interleaved steps). Results go to
`benchmarks/results/speed{,-quick}.json` and `.md`.

    python benchmarks/speed.py           # hidden 1024, intermediate 2816, 8 layers (4 shallow), rank 8, 512 tokens
    python benchmarks/speed.py --expert-layers deep   # the asymmetric layout (results in speed-deep.*)
    python benchmarks/speed.py --quick   # tiny shapes, seconds: keeps the script working (run by the test suite)
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import pmoe  # noqa: E402
from pmoe.modeling_pmoe import CACHE_KWARG  # noqa: E402


FULL = dict(vocab=32000, hidden=1024, intermediate=2816, layers=8, shallow=4, heads=16, kv_heads=16, rank=8,
            seq=512, decode=32, experts=[1, 8, 50], repeats=5, prefill_repeats=11, training_repeats=9, warmup=1)
QUICK = dict(vocab=512, hidden=128, intermediate=352, layers=4, shallow=2, heads=4, kv_heads=4, rank=4,
             seq=64, decode=8, experts=[1, 4], repeats=3, prefill_repeats=3, training_repeats=3, warmup=1)
# Where the real-text benchmark's prompts were routed (`cl_benchmark.py --routing-only`): each prompt's share of the
# embedding screen, the first-layer screen and the boundary router weights the matching prefill case's ratio.
ROUTING_RESULTS = [os.path.join(os.path.dirname(__file__), "results", f"cl-benchmark-routing-{name}.json")
                   for name in ("standard", "long")]


# ------------------------------------------------------------------------------------------- measuring
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def paired_medians(functions: dict, device, repeats: int, warmup: int, reference: str | None = None):
    """Median seconds of each function, their runs interleaved (a, b, a, b, ...; the order flipping every repeat) so
    that every contender sees the same machine state: on a busy or thermally throttled CPU, timing one model after
    the other biases the ratio. With `reference`, also each function's median over the repeats of its time divided
    by the reference's time in the same repeat (less moved by a slow moment than a ratio of medians)."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for repeat in range(repeats):
        for name in (list(functions) if repeat % 2 == 0 else list(reversed(functions))):
            synchronize(device)
            start = time.perf_counter()
            result = functions[name]()
            synchronize(device)
            times[name].append(result if isinstance(result, float) else time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    if reference is None:
        return medians
    ratios = {name: statistics.median(t / r for t, r in zip(values, times[reference]))
              for name, values in times.items()}
    return medians, ratios


def peak_memory_of(case: str, args) -> int | None:
    """Peak memory of one case above the memory the built models take, measured in a fresh process so that the
    allocator's cache from other cases does not hide it (CPU: peak resident set; CUDA: peak allocated)."""
    if args.no_memory:
        return None
    command = [sys.executable, __file__, "--memory-case", case, "--device", args.device,
               "--expert-layers", args.expert_layers]
    if args.quick:
        command.append("--quick")
    if args.dtype:
        command += ["--dtype", args.dtype]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        print(f"memory of {case} failed: {result.stderr[-500:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def resident_peak_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_resident_peak():
    with open("/proc/self/clear_refs", "w") as handle:  # Linux: "5" resets VmHWM to the current RSS
        handle.write("5")


# ------------------------------------------------------------------------------------------- models
def make_llama(shape, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["seq"] + shape["decode"] + 8,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def share_base_weights(model, llama):
    """Make `model`'s base weights the Llama's own tensors (not copies), so that the models compared read the same
    memory and differ only by their code. With copies, where the allocator put each model's weights decided decode
    ratios on an AMD EPYC machine (`benchmarks/weight_placement.py` measures it)."""
    _, unexpected = model.load_state_dict(llama.state_dict(), strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{type(model).__name__} has no tensors for the Llama's {unexpected[:3]}")
    return model


def peft_lora(llama, shape):
    """PEFT LoRA on the experts' targets over a Llama that shares `llama`'s weights (`get_peft_model` rewrites the
    model it wraps, so not `llama` itself)."""
    from peft import LoraConfig, get_peft_model

    base = share_base_weights(LlamaForCausalLM(llama.config).to(device=llama.device, dtype=llama.dtype), llama)
    return get_peft_model(
        base, LoraConfig(r=shape["rank"], lora_alpha=2 * shape["rank"], lora_dropout=0.0, target_modules=targets(shape))
    )


def task_tokens(shape, task: int, sequences: int, length: int, seed: int) -> torch.Tensor:
    """Sequences of synthetic task `task`: tokens drawn from its own slice of the vocabulary (64 tasks' worth)."""
    width = (shape["vocab"] - 3) // 64
    generator = torch.Generator().manual_seed(seed * 1000 + task)
    return torch.randint(3 + task * width, 3 + (task + 1) * width, (sequences, length), generator=generator)


@torch.no_grad()
def task_features(llama, shape, num_tasks: int, router_input_layer: int) -> dict[int, list[torch.Tensor]]:
    """Per task, the hidden states its training prompts give at the router's input, at the token embeddings and at the
    input of layer 1 (the screens' inputs): what fitting its keys sees (the expert-free model is the Llama, same
    weights)."""
    features = {0: [], 1: [], router_input_layer: []}
    for task in range(num_tasks):
        input_ids = task_tokens(shape, task, 4, shape["seq"], seed=1).to(llama.device)  # as long as the timed prompt
        hidden_states = llama.model(input_ids=input_ids, output_hidden_states=True).hidden_states  # (no LM head)
        for layer in features:
            features[layer].append(hidden_states[layer])
    return features


def make_pmoe(llama, shape, num_experts, routed: bool, features=None, embedding_screen_unsure=False,
              share_weights=True, **options):
    """PMoE from the same weights with `num_experts` trained-looking experts (random LoRA B); the Llama's own tensors
    (`share_base_weights`) unless `share_weights=False` (its own copy, as `from_dense` makes).

    `routed`: each expert's key is fitted on its own synthetic task's prompts (`task_features`), and the prompts
    timed belong to task 0, so the default router sends them to one expert, as the benchmarks' real prompts are
    (routing 99-100%). Otherwise every key is identical: equal gates, every expert computed (the worst case).
    `embedding_screen_unsure`: the embedding screen's keys are all alike (it is sure of no prompt), so the first-layer
    screen routes the prompt after one layer of the expert-free pass: what a prompt of two tasks that share an
    instruction costs."""
    model = pmoe.PMoEForCausalLM.from_dense(llama, num_shallow_layers=shape["shallow"], expert_rank=shape["rank"],
                                            expert_layers=shape["expert_layers"], **options).eval()
    if share_weights:
        share_base_weights(model, llama)
    generator = torch.Generator().manual_seed(1)
    for index in range(num_experts):
        model.add_expert(f"task-{index}")
    # The router at its input layer and, when the model has them, the screens at the token embeddings and layer 1.
    routers = {model.config.router_input_layer: model.model.routers[0], **dict(model.model._screens())}
    with torch.no_grad():
        for module in model.expert_modules():
            for expert in module.experts:
                for tensor in (expert.lora_A, expert.lora_B):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor) * 0.01)
        for layer, router in routers.items():
            for index, entry in enumerate(router.experts):
                if routed and not (embedding_screen_unsure and layer == 0):
                    pooled, _ = router.features(features[layer][index], None)
                    entry.accumulate(pooled.reshape(-1, pooled.shape[-1]))
                else:
                    entry.count.fill_(100.0)
                    if entry.kind == "lda":
                        entry.feature_outer_sum.copy_(100.0 * torch.eye(entry.feature_outer_sum.shape[0]))
                    else:
                        entry.feature_sq_sum.fill_(100.0)
    model.training_expert = None
    return model


# ------------------------------------------------------------------------------------------- real-text prompts
STAGE_NAMES = {0: "embedding screen", 1: "first-layer screen", None: "boundary router"}


def routing_shares(path: str) -> dict[int, float] | None:
    """From a `cl_benchmark.py --routing-only` results file: the share of its prompts routed at each depth of the
    expert-free pass, `{0: embedding screen, 1: first-layer screen, None: the boundary router (the whole pass)}`, over
    every task of every order in its `lda + screens` rows (`None` when the file has no such rows)."""
    with open(path) as handle:
        routing = json.load(handle)["routing"]
    counts = {}
    for rows in routing.values():
        for task in rows.get("lda + screens", {}).values():
            for layer, screened in task["screened"].items():
                counts[int(layer)] = counts.get(int(layer), 0) + screened
            counts[None] = counts.get(None, 0) + task["prompts"] - sum(task["screened"].values())
    total = sum(counts.values())
    return {layer: count / total for layer, count in counts.items()} if total else None


def real_text_prefill(inference: dict, shape, paths: list[str]) -> dict:
    """Prefill over the real-text benchmark's prompts, computed (not timed on real text): the ratios of the cases whose
    prompt the embedding screen, the first-layer screen and no screen routed (`pmoe-N`, `-first-layer-screen`,
    `-unscreened` at N = the middle expert count), weighted by the shares of the benchmark's prompts each routed."""
    experts = shape["experts"][1]
    cases = {0: f"pmoe-{experts}", 1: f"pmoe-{experts}-first-layer-screen", None: f"pmoe-{experts}-unscreened"}
    passes = {0: 0, 1: 1, None: shape["shallow"]}
    if not all(inference.get(case, {}).get("expert_free_pass") == passes[layer] for layer, case in cases.items()):
        print(f"real-text prefill not computed: the cases {sorted(cases.values())} did not run the expert-free pass "
              f"as far as {passes}", flush=True)
        return {}
    averages = {}
    for path in paths:
        shares = routing_shares(path) if os.path.exists(path) else None
        if shares is None or set(shares) - set(cases):
            print(f"real-text prefill: {path} has no screens' shares this script can weight", flush=True)
            continue
        averages[os.path.basename(path)] = {
            "shares": {STAGE_NAMES[layer]: share for layer, share in shares.items()},
            **{f"{kind}_ratio": sum(share * inference[cases[layer]][f"{kind}_ratio"] for layer, share in shares.items())
               for kind in ("prefill", "generate_prefill")},
        }
    return averages


# ------------------------------------------------------------------------------------------- cases
def prefill_fn(model, input_ids, logits_to_keep: int = 0):
    """A forward over the prompt filling the KV cache; `logits_to_keep=1`: only the last token's logits, as
    `generate` runs its prefill (0: every token's, as scoring a text or a training forward does)."""
    @torch.no_grad()
    def prefill():
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep)

    return prefill


@torch.no_grad()
def interleaved_decode(models: dict, input_ids, steps: int, device, repeats: int, warmup: int) -> dict:
    """Median seconds per decoded token of each model (`{name: (model, sequence_routing)}`): each prefills the prompt,
    then they decode one token at a time taking turns at every step (the order flipping each step), so every step of
    one is timed next to a step of the other under the same machine state; the median over all steps of all repeats.
    (Timing whole decode runs one after the other let a busy moment land on one model: identical decode paths
    measured 7% apart.)"""
    times = {name: [] for name in models}
    for repeat in range(warmup + repeats):
        states = {}
        for name, (model, sequence_routing) in models.items():
            out = model(input_ids=input_ids, use_cache=True)
            kwargs = {"routing_weights": out.routing_weights} if sequence_routing else {}
            states[name] = (getattr(out, CACHE_KWARG), out.logits[:, -1:].argmax(-1), kwargs)  # >= 5.24: `cache`
        for step in range(steps):
            for name in (list(models) if step % 2 == 0 else list(reversed(models))):
                model = models[name][0]
                cache, token, kwargs = states[name]
                synchronize(device)
                start = time.perf_counter()
                out = model(input_ids=token, use_cache=True, **{CACHE_KWARG: cache}, **kwargs)
                token = out.logits[:, -1:].argmax(-1)
                synchronize(device)
                if repeat >= warmup:
                    times[name].append(time.perf_counter() - start)
                states[name] = (cache, token, kwargs)
    return {name: statistics.median(values) for name, values in times.items()}


def training_step_fn(model, input_ids, labels):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def targets(shape) -> list[str]:
    """The experts' default targets for this layout (the embedding too with experts in every layer), for PEFT LoRA."""
    return pmoe.configuration_pmoe.default_expert_target_modules(shape["expert_layers"])


def router_input_layer(shape) -> int:
    """The layer whose input the default router reads, for this shape and layout."""
    config = pmoe.PMoEConfig(num_hidden_layers=shape["layers"], num_shallow_layers=shape["shallow"],
                             expert_layers=shape["expert_layers"])
    return config.router_input_layer


def build_training_model(name, shape, device, dtype):
    if name == "full-finetuning":
        return make_llama(shape, device, dtype)
    if name == "peft-lora-all-layers":
        return peft_lora(make_llama(shape, device, dtype), shape)
    model = make_pmoe(make_llama(shape, device, dtype), shape, 1, routed=False)
    model.training_expert = 0
    key = model.model.routers[0].experts[0]
    with torch.no_grad():
        for statistic in key.statistics:
            getattr(key, statistic).zero_()
    if name == "pmoe":  # as the callback trains a task: its key fitted in a pass before the first step
        input_ids, labels = inputs(shape, device)
        model.fit_router_key([{"input_ids": input_ids, "labels": labels}])
    return model  # "pmoe-fitting-in-steps": an empty key, which the training steps fit


def key_fitting_fn(model, input_ids, labels):
    """`fit_router_key` over one batch (what the callback runs over a task's sample before its first step)."""

    def fit():
        model.fit_router_key([{"input_ids": input_ids, "labels": labels}])

    return fit


def inputs(shape, device):
    input_ids = task_tokens(shape, 0, 1, shape["seq"], seed=0).to(device)  # a prompt of task 0
    labels = input_ids.clone()
    labels[:, : shape["seq"] // 2] = -100  # the first half is the prompt
    return input_ids, labels


def run_memory_case(case, shape, device, dtype):
    """`--memory-case`: build the models of one case, run it once to warm up, then measure one more run."""
    input_ids, labels = inputs(shape, device)
    if case.startswith("train:"):
        fn = training_step_fn(build_training_model(case.split(":", 1)[1], shape, device, dtype), input_ids, labels)
    else:
        llama = make_llama(shape, device, dtype)
        if case == "prefill:llama":
            fn = prefill_fn(llama, input_ids)
        else:
            num_experts, keys = case.split(":", 1)[1].split("-")
            routed = keys == "routed"
            features = task_features(llama, shape, int(num_experts), router_input_layer(shape)) if routed else None
            fn = prefill_fn(make_pmoe(llama, shape, int(num_experts), routed, features), input_ids)
    fn()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset_resident_peak()
        base = resident_peak_bytes()
        fn()
        peak = resident_peak_bytes() - base
    print(json.dumps({"case": case, "peak_bytes": max(0, peak)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for smoke runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each case (and of prefill, unless "
                        "--prefill-repeats says otherwise)")
    parser.add_argument("--prefill-repeats", type=int, default=None,
                        help="timed prefill runs of each case: more than the rest, since one prefill is short and its "
                             "ratio is what the speed targets read")
    parser.add_argument("--routing-results", nargs="*", default=ROUTING_RESULTS, metavar="JSON",
                        help="`cl_benchmark.py --routing-only` results whose screens' shares weight the prefill cases "
                             "into a prefill over real-text prompts (default: the committed Standard and Long runs)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory measurements")
    parser.add_argument("--expert-layers", choices=["all", "deep"], default="all",
                        help="PMoE layout: experts in every layer (the default) or in the deep layers only")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else FULL, expert_layers=args.expert_layers)
    args.prefill_repeats = args.prefill_repeats or args.repeats or shape["prefill_repeats"]
    args.repeats = args.repeats or shape["repeats"]
    args.warmup = shape["warmup"] if args.warmup is None else args.warmup
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.memory_case:
        return run_memory_case(args.memory_case, shape, device, dtype)

    started = time.time()
    input_ids, labels = inputs(shape, device)
    results = {"shape": {k: v for k, v in shape.items()
                         if k not in ("repeats", "prefill_repeats", "training_repeats", "warmup")},
               "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "repeats": args.repeats, "prefill_repeats": args.prefill_repeats,
               "training_repeats": max(args.repeats, shape["training_repeats"]),
               "inference": {}, "training": {}}
    print(f"shape {results['shape']} on {device} ({results['dtype']}, {results['threads']} threads)", flush=True)
    llama = make_llama(shape, device, dtype)
    # Prefill two ways: every token's logits (a scoring forward: what the speed issue measured) and the last token's
    # only (what `generate` runs before the first new token, where the LM head is not the fifth of the work it is here).
    prefill_kinds = {"prefill": 0, "generate_prefill": 1}
    features = task_features(llama, shape, max(shape["experts"]), router_input_layer(shape))
    # (name suffix, number of experts, routed, options): the default at 1 / 8 / 50 experts, the worst case, and with
    # experts in every layer a prompt the embedding screen leaves to the first-layer screen (one layer of the
    # expert-free pass), and one no screen routes (`router_screen_margin=None`: the whole pass, what every prompt cost
    # before the screens).
    cases = [("", n, True, {}) for n in shape["experts"]] + [("-all", n, False, {}) for n in shape["experts"] if n > 1]
    if shape["expert_layers"] == "all":
        cases += [("-first-layer-screen", shape["experts"][1], True, {"embedding_screen_unsure": True}),
                  ("-unscreened", shape["experts"][1], True, {"router_screen_margin": None})]
    def time_inference(name, model, sequence_routing, **row):
        for kind, logits_to_keep in prefill_kinds.items():
            prefill, prefill_ratios = paired_medians(
                {"llama": prefill_fn(llama, input_ids, logits_to_keep),
                 name: prefill_fn(model, input_ids, logits_to_keep)},
                device, args.prefill_repeats, args.warmup, reference="llama")
            row.update({f"{kind}_s": prefill[name], f"llama_{kind}_s": prefill["llama"],
                        f"{kind}_ratio": prefill_ratios[name]})
        decode = interleaved_decode({"llama": (llama, False), name: (model, sequence_routing)}, input_ids,
                                    shape["decode"], device, args.repeats, args.warmup)
        results["inference"][name] = {
            **row,
            "decode_s_per_token": decode[name], "llama_decode_s_per_token": decode["llama"],
            "decode_ratio": decode[name] / decode["llama"],
        }
        print(name, results["inference"][name], flush=True)

    # The LoRA peer, unmerged (as a served adapter runs): what one LoRA on these targets costs without any routing.
    time_inference("peft-lora", peft_lora(llama, shape).eval(), False,
                   experts=None, experts_used=None, prefill_peak_bytes=None, expert_free_pass=None)
    for suffix, num_experts, routed, options in cases:
        model = make_pmoe(llama, shape, num_experts, routed, features, **options)
        name = f"pmoe-{num_experts}{suffix}"
        calls = []  # the layers a prefill runs twice: the expert-free pass ran through them
        hooks = [layer.register_forward_hook(lambda *args, index=index: calls.append(index))
                 for index, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            used = int((model(input_ids=input_ids).routing_weights > 0).sum())
        for hook in hooks:
            hook.remove()
        memory = None if options else peak_memory_of(f"prefill:{num_experts}-{'routed' if routed else 'all'}", args)
        time_inference(name, model, True, experts=num_experts, experts_used=used, prefill_peak_bytes=memory,
                       expert_free_pass=len(calls) - len(model.model.layers))
        del model
        gc.collect()
    results["llama_prefill_peak_bytes"] = peak_memory_of("prefill:llama", args)
    if shape["expert_layers"] == "all":
        results["real_text_prefill"] = real_text_prefill(results["inference"], shape, args.routing_results)

    # Training: full fine-tuning, PEFT LoRA on every layer, PMoE training its newest expert: interleaved steps.
    names = ["full-finetuning", "peft-lora-all-layers", "pmoe", "pmoe-fitting-in-steps"]
    models = {name: build_training_model(name, shape, device, dtype) for name in names}
    functions = {name: training_step_fn(models[name], input_ids, labels) for name in names}
    functions["key-fitting"] = key_fitting_fn(models["pmoe"], input_ids, labels)
    steps, step_ratios = paired_medians(functions, device, results["training_repeats"], args.warmup,
                                        reference="peft-lora-all-layers")
    results["key_fitting"] = {"pass_s_per_sequence": steps["key-fitting"] / input_ids.shape[0],
                              "ratio_to_pmoe_step": steps["key-fitting"] / steps["pmoe"],
                              "router_fit_sequences": models["pmoe"].config.router_fit_sequences}
    for name in names:
        results["training"][name] = {
            "step_s": steps[name], "ratio_to_peft": step_ratios[name],
            "trainable_parameters": sum(p.numel() for p in models[name].parameters() if p.requires_grad),
            "step_peak_bytes": peak_memory_of(f"train:{name}", args),
        }
        print(name, results["training"][name], flush=True)

    model = models["pmoe"]
    expert = model.expert_parameters(0)
    added = sum(p.numel() for p in expert.values())
    added_bytes = sum(t.numel() * t.element_size() for t in model.expert_tensors(0).values())
    results["per_task"] = {"parameters_added": added, "checkpoint_bytes_added": added_bytes,
                           "base_parameters": sum(p.numel() for p in llama.parameters())}

    results["wall_seconds"] = time.time() - started
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, ("speed" if args.expert_layers == "all" else "speed-deep")
                        + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(results))
    print(markdown(results))


def mib(value):
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def markdown(results) -> str:
    inference, training = results["inference"], results["training"]
    shape = results["shape"]
    lines = [
        f"Shape: hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} layers "
        f"({shape['shallow']} shallow), experts in {'every layer' if shape['expert_layers'] == 'all' else 'the deep layers'}, vocab {shape['vocab']}, rank {shape['rank']} on {', '.join(targets(shape))}, batch 1, "
        f"{shape['seq']} prompt tokens, {shape['decode']} decoded (decode: the median step, Llama and the model taking turns at every step); {results['device']} {results['dtype']}, "
        f"{results['threads']} threads, torch {results['torch']}. Medians of {results['repeats']} interleaved runs "
        f"({results.get('prefill_repeats', results['repeats'])} for prefill, {results['training_repeats']} for training); "
        "prefill and training ratios are the median of the runs' ratios "
        "to the peer timed alongside (the same-weights Llama, PEFT LoRA for training). `peft-lora`: PEFT LoRA on the same targets, "
        "unmerged (as a served adapter runs). PMoE with default settings (sequence routing, LDA "
        f"keys, router reading the input of layer {router_input_layer(shape)}, `router_min_gate` 0.01"
        + (", the embedding and first-layer screens at `router_screen_margin` 20" if shape["expert_layers"] == "all"
           else "")
        + "). `pmoe-N`: N "
        "experts whose keys were fitted on N synthetic tasks (each its own slice of the vocabulary) and a prompt of "
        "task 0, so the router picks one expert, as it does for 99-100% of the real-text benchmark's prompts"
        + (" (and the embedding screen is sure of it, so prefill skips the expert-free pass)"
           if shape["expert_layers"] == "all" else "") + "; "
        "`pmoe-N-all`: N identical keys, so every expert gets an equal gate and is computed (the worst case; the "
        "screens are not sure); `-first-layer-screen`: the embedding screen's keys all alike, so the first-layer "
        "screen routes the prompt after one layer of the expert-free pass (what a prompt of a task that shares its "
        "vocabulary with another costs); `-unscreened`: "
        "`router_screen_margin=None`, the whole expert-free pass at every prefill (what a prompt neither screen is "
        "sure of costs). The expert-free pass column: how many layers it ran. Prefill: a forward over the prompt "
        "with every token's logits (as scoring a text does); generate's prefill: the same with only the last token's "
        "logits (`logits_to_keep=1`, what `generate` runs before the first new token). "
        "Training: `pmoe` trains as the Trainer callback trains a task (its key fitted in one pass before the first "
        "step, so no step runs the expert-free pass); `pmoe-fitting-in-steps`: a loop without the callback, whose first "
        "`router_fit_sequences` sequences fit the key inside the steps.",
        "",
        "| model | experts used | expert-free pass | prefill (s) | x Llama | generate's prefill (s) | x Llama | "
        "decode (ms/token) | x Llama | prefill peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = next(iter(inference.values()))  # (every row carries the Llama timed alongside it)
    lines.append(f"| llama | - | - | {first['llama_prefill_s']:.4f} | 1.000 | "
                 f"{first['llama_generate_prefill_s']:.4f} | 1.000 | {1000 * first['llama_decode_s_per_token']:.2f} | 1.000 | "
                 f"{mib(results.get('llama_prefill_peak_bytes'))} |")
    for name, row in inference.items():
        used = "-" if row["experts"] is None else f"{row['experts_used']} of {row['experts']}"
        ran = {None: "-", 0: "no"}.get(row.get("expert_free_pass"), f"{row.get('expert_free_pass')} layer(s)")
        lines.append(
            f"| {name} | {used} | {ran} | {row['prefill_s']:.4f} | {row['prefill_ratio']:.3f} | "
            f"{row['generate_prefill_s']:.4f} | {row['generate_prefill_ratio']:.3f} | "
            f"{1000 * row['decode_s_per_token']:.2f} | {row['decode_ratio']:.3f} | {mib(row['prefill_peak_bytes'])} |"
        )
    if results.get("real_text_prefill"):
        experts = shape["experts"][1]
        lines += ["", f"Prefill over the real-text benchmark's prompts at {experts} experts, computed from the rows "
                  f"above (`pmoe-{experts}`, `-first-layer-screen`, `-unscreened`) weighted by the share of the "
                  "prompts each stage routed in `cl_benchmark.py --routing-only` (the results file named), not timed "
                  "on real text:", "",
                  "| routing results | " + " | ".join(f"share: {stage}" for stage in STAGE_NAMES.values())
                  + " | prefill x Llama | generate's prefill x Llama |",
                  "|---|---|---|---|---|---|"]
        for source, row in results["real_text_prefill"].items():
            shares = " | ".join(f"{100 * row['shares'].get(stage, 0.0):.1f}%" for stage in STAGE_NAMES.values())
            lines.append(f"| {source} | {shares} | {row['prefill_ratio']:.3f} | {row['generate_prefill_ratio']:.3f} |")
    lines += ["", "| training step | seconds | x PEFT LoRA | trainable parameters | step peak memory (MiB) |",
              "|---|---|---|---|---|"]
    for name, row in training.items():
        lines.append(f"| {name} | {row['step_s']:.4f} | {row['ratio_to_peft']:.3f} | "
                     f"{row['trainable_parameters']:,} | {mib(row['step_peak_bytes'])} |")
    fitting = results["key_fitting"]
    sequences = fitting["router_fit_sequences"]
    lines += ["", f"Key fitting (`fit_router_key`, once per task before its first step): "
              f"{fitting['pass_s_per_sequence']:.4f} s per sequence, {fitting['ratio_to_pmoe_step']:.3f}x the time of "
              "a `pmoe` training step on the same sequence"
              + ("" if sequences is None else
                 f"; over {sequences} sequences: {sequences * fitting['pass_s_per_sequence'] / 60:.1f} minutes")
              + "."]
    per_task = results["per_task"]
    lines += ["", f"Per task: {per_task['parameters_added']:,} parameters "
              f"({100 * per_task['parameters_added'] / per_task['base_parameters']:.2f}% of the base model), "
              f"{per_task['checkpoint_bytes_added'] / 2**20:.2f} MiB of checkpoint.",
              "", f"Wall time of the whole run: {results['wall_seconds'] / 60:.1f} minutes.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
