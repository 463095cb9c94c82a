"""The CPU's bf16 matmul peak, measured in the run, and model-FLOPs utilisation (MFU) against it.

    python -m mistral_lightning.benchmarks.cpu_mfu [--size 4096]

The peak is the best of several large square bf16 matmuls on all of torch's threads: what this machine's
matrix units really deliver, where a data-sheet figure would not account for clocks, the hypervisor or
its neighbours. Training MFU divides the model FLOPs per token (RecipeThroughputMonitor's formula) times
tokens/s by it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mistral_lightning.callbacks import training_flops_per_token
from mistral_lightning.config import MistralConfig


def matmul_peak_tflops(size: int = 4096, repeats: int = 8) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b  # warm-up: packing buffers, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def mfu(tokens_per_s: float, config: MistralConfig, seq_length: int, peak_tflops: float) -> float:
    return tokens_per_s * training_flops_per_token(config, seq_length) / (peak_tflops * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    print(json.dumps({"matmul_size": args.size, "peak_tflops": matmul_peak_tflops(args.size)}))


if __name__ == "__main__":
    main()
