"""Peak memory and tokens/s of LoRA and QLoRA against full fine-tuning, on the bench config, in one run.

    python -m mistral_lightning.benchmarks.lora_memory [--seq 2048 8192] [--steps 2] [--checkpointing none|full] [--threads 2]

Each (method, sequence length) is a fresh worker process running the same training step on the same random
tokens: bf16 weights, batch 1, the module's AdamW (`optim.build_optimizer`: over the trainable parameters
only), eager blocks, activation checkpointing as `--checkpointing` says (`parallel.apply_activation_checkpointing`;
without it the activations dominate all three at these lengths). The model is built as training builds it (meta device,
adapters, NF4 base for QLoRA, filled by `init_weights`). "full" trains every weight; "lora" trains rank-16
adapters on every block projection over a frozen bf16 base; "qlora" is the same over a torchao NF4 base.
Peak memory: the CPU allocator's own running total of allocated tensor bytes, recorded by the profiler over
the build and the first two optimizer steps (the peak is reached once the gradients, AdamW's states and a
step's activations are alive together). Tokens/s: the steps after those, unprofiled. Ratios are taken
against the full fine-tune of the same length, measured in the same run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import time

import torch

from mistral_lightning.adapters.lora import LoRAConfig, apply_lora
from mistral_lightning.adapters.nf4 import materialize_nf4_, quantize_base_
from mistral_lightning.benchmarks.allocator_peak import peak_allocated_bytes
from mistral_lightning.benchmarks.common import (
    BENCH_CONFIG,
    machine,
    run_worker,
    save_json,
    write_worker_result,
)
from mistral_lightning.model import Mistral
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer
from mistral_lightning.training.parallel import apply_activation_checkpointing, init_adapters, init_weights

METHODS = {
    "full": None,
    "lora": LoRAConfig(rank=16, alpha=32.0, targets="all-linear"),
    "qlora": LoRAConfig(rank=16, alpha=32.0, targets="all-linear", quantize_base="nf4"),
}
PROFILED_STEPS = 2
RESULT_NAME = "lora_memory"  # + _checkpointing_{none,full}.json


def build(method: str, checkpointing: str) -> Mistral:
    lora = METHODS[method]
    with torch.device("meta"):
        model = Mistral(BENCH_CONFIG)
    if lora is not None:
        apply_lora(model, lora)
    model.to(torch.bfloat16)  # bf16 weights and adapters, as under bf16-true
    if lora is not None and lora.quantize_base == "nf4":
        quantize_base_(model)
    apply_activation_checkpointing(model, checkpointing)
    model.to_empty(device="cpu")
    materialize_nf4_(model)
    init_weights(model, 0)
    if lora is not None:
        init_adapters(model, 0)
    return model


def worker(method: str, seq_length: int, steps: int, checkpointing: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(
        3, BENCH_CONFIG.vocab_size, (1, seq_length), generator=torch.Generator().manual_seed(0)
    )

    def step(model, optimizer) -> float:
        loss = model.loss(tokens, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build(method, checkpointing)
        optimizer = build_optimizer(model, OptimizerConfig())
        for _ in range(PROFILED_STEPS):
            step(model, optimizer)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "seq_length": seq_length,
        "activation_checkpointing": checkpointing,
        "peak_allocated_bytes": peak_allocated_bytes(prof),
        "tokens_per_s": steps * seq_length / seconds,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "timed_steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps after the profiled ones")
    parser.add_argument("--checkpointing", choices=["none", "full"], default="none")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (OMP_NUM_THREADS)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        write_worker_result(args.out, worker(args.method, args.seq[0], args.steps, args.checkpointing))
        return
    rows = []
    for seq_length in args.seq:
        by_method = {}
        for method in METHODS:
            by_method[method] = run_worker(
                "mistral_lightning.benchmarks.lora_memory",
                [
                    *("--method", method, "--seq", str(seq_length)),
                    *("--steps", str(args.steps), "--checkpointing", args.checkpointing),
                ],
                threads=args.threads,
            )
            print(by_method[method], flush=True)
        full = by_method["full"]
        for result in by_method.values():
            result["memory_vs_full"] = result["peak_allocated_bytes"] / full["peak_allocated_bytes"]
            result["tokens_per_s_vs_full"] = result["tokens_per_s"] / full["tokens_per_s"]
            rows.append(result)
    print(
        f"{'seq':>6} {'method':>6} {'peak MB':>9} {'x full':>7} {'tokens/s':>9} {'x full':>7} {'trainable':>10}"
    )
    for row in rows:
        print(
            f"{row['seq_length']:>6} {row['method']:>6} {row['peak_allocated_bytes'] / 1e6:>9.0f} "
            f"{row['memory_vs_full']:>7.2f} {row['tokens_per_s']:>9.0f} {row['tokens_per_s_vs_full']:>7.2f} "
            f"{row['trainable_parameters']:>10}"
        )
    save_json(
        f"{RESULT_NAME}_checkpointing_{args.checkpointing}",
        {"machine": machine(), "config": "BENCH_CONFIG", "rows": rows},
    )


if __name__ == "__main__":
    main()
