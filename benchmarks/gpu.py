"""Single-device benchmark of the 7B layer shape at 32K on one CUDA GPU or Ascend NPU; under 5 minutes.

    python benchmarks/gpu.py                      # as many 7B layers as fit, seq 32768, window 4096
    python benchmarks/gpu.py --layers 8 --steps 5 --activation-checkpointing selective
    python benchmarks/gpu.py --dry-run            # CPU, tiny shapes: checks this script's logic only

The model is the real `Mistral` with Mistral-7B's layer shape (hidden 4096, FFN 14336, 32/8 heads,
head_dim 128, window 4096, vocab 32000), bf16 weights and AdamW states, batch 1, activation
checkpointing from training/parallel.py's plan (default "full"). The number of layers is chosen by measuring the
peak memory of a 1- and a 2-layer model and filling 90% of the device. Reported, in the recipe's units:
tokens/s per device, s/step, TFLOPs per device, MFU (model FLOPs as RecipeThroughputMonitor counts them, peak
from its table or --peak-tflops), peak memory, and the tokens/s/p the whole 32-layer model would reach
on 8 such devices at the same MFU (an estimate to set beside the recipe's 2806 tokens/s/p on 8 x 910B).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import torch

from mistral_lightning.callbacks import lookup_peak_tflops, training_flops_per_token
from mistral_lightning.config import MistralConfig
from mistral_lightning.devices import (
    accelerator_module,
    device_name,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from mistral_lightning.kernels import resolve_backend
from mistral_lightning.model import Mistral
from mistral_lightning.training.optim import OptimizerConfig, build_optimizer
from mistral_lightning.training.parallel import apply_activation_checkpointing


def pick_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    try:
        importlib.import_module("torch_npu")  # registers torch.npu
        if torch.npu.is_available():
            return torch.device("npu", 0)
    except ImportError:
        pass
    raise SystemExit("no CUDA GPU or Ascend NPU found; use --dry-run to check the script on CPU")


def layers_that_fit(one_layer_bytes: int, two_layer_bytes: int, capacity_bytes: int, most: int) -> int:
    """Layers whose extrapolated peak stays within capacity: peak(L) = peak(1) + (L - 1) * per-layer."""
    per_layer = max(1, two_layer_bytes - one_layer_bytes)
    return max(1, min(most, 1 + (capacity_bytes - one_layer_bytes) // per_layer))


def train(config: MistralConfig, args: argparse.Namespace, device: torch.device, steps: int) -> dict:
    """Build, then run `steps` optimizer steps after one warm-up step; timings and peak memory."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Mistral(config).to(torch.bfloat16)
    model.to_empty(device=device)
    model.init_weights()
    apply_activation_checkpointing(model, args.activation_checkpointing)
    optimizer = build_optimizer(model, OptimizerConfig())
    tokens = torch.randint(3, config.vocab_size, (1, args.seq + 1), device=device)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]
    reset_peak_memory(device)
    start = 0.0
    for step in range(steps + 1):
        model.loss(input_ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step == 0:
            start = time.perf_counter()
    seconds = (time.perf_counter() - start) / steps if steps else float("nan")
    peak = peak_memory(device).get("peak_allocated", 0)
    backend = resolve_backend(input_ids)
    del model, optimizer
    if device.type != "cpu":
        accelerator_module(device).empty_cache()
    return {"s_per_step": seconds, "peak_memory_bytes": peak, "attention_backend": backend}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=None, help="default: as many as fit (up to 32)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps, after one warm-up step")
    parser.add_argument("--activation-checkpointing", default="full", choices=["none", "full", "selective"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device name")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 layers, seq 256")
    args = parser.parse_args(argv)
    device = pick_device(args.dry_run)
    full = MistralConfig.from_name("mistral-7b-32k", max_seq_length=max(32768, args.seq))
    if args.dry_run:
        # The tiny preset's widths at the 7B's depth: the full-model estimate still covers 32 layers.
        full = MistralConfig.from_name("tiny", num_layers=full.num_layers)
        args.seq, args.layers, args.steps = min(args.seq, 256), args.layers or 2, min(args.steps, 2)
    layers = args.layers
    if layers is None:
        # Probe: one step of a 1- and a 2-layer model gives the fixed and the per-layer memory.
        probes = [
            train(full.replace(num_layers=n), args, device, steps=0)["peak_memory_bytes"] for n in (1, 2)
        ]
        total = accelerator_module(device).get_device_properties(device).total_memory
        layers = layers_that_fit(probes[0], probes[1], int(0.9 * total), full.num_layers)
    config = full.replace(num_layers=layers)
    result = train(config, args, device, args.steps)
    name = "CPU (dry run)" if args.dry_run else device_name(device)
    peak_tflops = args.peak_tflops or lookup_peak_tflops(name)
    tokens_per_s = args.seq / result["s_per_step"]
    flops_per_s = tokens_per_s * training_flops_per_token(config, args.seq)
    mfu = flops_per_s / (peak_tflops * 1e12) if peak_tflops else None
    report = {
        "device": name,
        "layers": layers,
        "seq_length": args.seq,
        "window": config.sliding_window,
        "activation_checkpointing": args.activation_checkpointing,
        **result,
        "tokens_per_sec_per_device": tokens_per_s,
        "tflops_per_device": flops_per_s / 1e12,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
        # At equal MFU, tokens/s scale inversely with FLOPs per token; TP8 splits them over 8 devices.
        "full_model_tokens_per_sec_per_device_estimate": mfu
        * peak_tflops
        * 1e12
        / training_flops_per_token(full, args.seq)
        if mfu
        else None,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
