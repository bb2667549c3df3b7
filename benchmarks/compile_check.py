#!/usr/bin/env python
"""`torch.compile` of a default PMoE model with a real backend (inductor by default): compile time, the largest logit
difference to eager, eager and compiled forward time, and the graph breaks. The test suite checks compile with the
`aot_eager` backend (no C++ build); this is the by-hand check behind the README's inductor figures.

    python benchmarks/compile_check.py                  # small Llama (hidden 256, 4 layers), 2 experts, CPU
    python benchmarks/compile_check.py --device cuda    # on an accelerator (bfloat16)
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import pmoe  # noqa: E402


def timed(fn, device, repeats=20):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4))
    model = pmoe.PMoEForCausalLM.from_dense(dense)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for task in ("a", "b"):
            model.add_expert(task)
        for module in model.expert_modules():  # trained-looking experts: the update is not zero
            for expert in module.experts:
                expert.lora_B.copy_(torch.randn(expert.lora_B.shape, generator=generator) * 0.02)
        for key in model.model.routers[0].experts:  # fitted keys (10 random features each), so the experts are used
            key.accumulate(torch.randn(10, key.feature_sum.shape[0], generator=generator) + torch.randn(1))
    model = model.to(device=device, dtype=dtype).eval()
    input_ids = torch.randint(3, 1000, (2, 64), generator=generator).to(device)

    with torch.no_grad():
        eager = model(input_ids=input_ids).logits
        explanation = torch._dynamo.explain(model)(input_ids=input_ids)
        torch._dynamo.reset()
        compiled_model = torch.compile(model, backend=args.backend)
        start = time.perf_counter()
        compiled = compiled_model(input_ids=input_ids).logits
        compile_seconds = time.perf_counter() - start
        eager_s = timed(lambda: model(input_ids=input_ids), device)
        compiled_s = timed(lambda: compiled_model(input_ids=input_ids), device)
    print(f"backend {args.backend} on {device} ({dtype}), torch {torch.__version__}")
    print(f"first call (compile): {compile_seconds:.1f} s")
    print(f"largest logit difference to eager: {(compiled.float() - eager.float()).abs().max().item():.2e}")
    print(f"forward: eager {1000 * eager_s:.2f} ms, compiled {1000 * compiled_s:.2f} ms "
          f"({eager_s / compiled_s:.2f}x faster)")
    print(f"experts used: {int((model(input_ids=input_ids).routing_weights > 0).sum())} gates > 0 over 2 prompts")
    print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
    for reason in explanation.break_reasons:
        print(f"  break at {reason.user_stack[-1].name} (line {reason.user_stack[-1].lineno}): "
              f"{str(reason.reason).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
