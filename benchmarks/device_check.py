"""One-GPU device check, about 6 minutes: kernels and model against references on the device, a few
`mistral-lightning fit` steps of the tiny config, `plan calibrate` on the device, and the 7B at 32K under each checkpointing choice at the depth
the plan fits (benchmarks/gpu.py), the plan's own choice also compiled.

    python -P -m mistral_lightning.benchmarks.device_check             # one CUDA GPU: writes benchmarks/results/<card>/
    python -P -m mistral_lightning.benchmarks.device_check --dry-run   # CPU, to check the script's own logic

Each section (and each 7B run) runs on its own and records "ok", its figures, or the error, so one failure does
not hide the rest; the JSON files are rewritten as each part ends, and are what the README's device rows quote.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from mistral_lightning.callbacks import lookup_peak_tflops
from mistral_lightning.child_processes import python_module_command, safe_path_env
from mistral_lightning.config import MistralConfig
from mistral_lightning.devices import device_name
from mistral_lightning.kernels import resolve_backend, sliding_window_attention
from mistral_lightning.model import Mistral
from mistral_lightning.training.device_rates import device_table

REPO = Path(__file__).resolve().parent.parent
# The 7B-shape runs: the plan's choice (eager, then compiled), then each policy for every block.
LAYER_RUNS = (("auto", False), ("auto", True), ("full", False), ("selective", False), ("none", False))
HEADROOM = 0.1


def dense_attention(q, k, v, window, document_ids=None):
    """Softmax attention in fp32 with the full [T, T] band mask written out from its definition."""
    seq_len, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = (x.float().repeat_interleave(group, dim=2) for x in (k, v))
    i = torch.arange(seq_len, device=q.device)[:, None]
    j = torch.arange(seq_len, device=q.device)[None, :]
    mask = (j <= i) & ((j > i - window) if window else torch.ones_like(j, dtype=torch.bool))
    mask = mask[None, None]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def attention_parity(device: torch.device) -> dict:
    """Forward and q/k/v gradients of every attention path the device takes, against dense fp32 attention."""
    results = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype, tolerance in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        for seq_len, window, documents in (
            (256, 64, False),
            (700, 128, True),
            (300, None, True),
            (96, 128, False),
        ):
            shapes = ((2, seq_len, 8, 64), (2, seq_len, 2, 64), (2, seq_len, 2, 64))
            q, k, v = (torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes)
            document_ids = None
            if documents:
                cuts = torch.tensor([0, seq_len // 3, seq_len // 3 + 7, seq_len], device=device)
                positions = torch.arange(seq_len, device=device)
                document_ids = (positions[None, :] >= cuts[1:-1, None]).sum(0).expand(2, seq_len).contiguous()
            out = sliding_window_attention(q, k, v, window, document_ids=document_ids)
            ref = dense_attention(q, k, v, window, document_ids)
            grad = torch.randn_like(out)
            ours = torch.autograd.grad(out, (q, k, v), grad)
            theirs = torch.autograd.grad(ref, (q, k, v), grad.float())
            errors = [(out.float() - ref).abs().max().item()]
            errors += [
                ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                for a, b in zip(ours, theirs)
            ]
            name = f"{str(dtype).removeprefix('torch.')} T={seq_len} W={window} docs={documents}"
            results[name] = {"max_error": max(errors), "ok": max(errors) <= tolerance}
    results["backend"] = resolve_backend(torch.empty(1, device=device))
    return results


def model_parity(device: torch.device) -> dict:
    """Logits and loss of our model against transformers' MistralForCausalLM on the device, in fp32."""
    import transformers

    config = MistralConfig.from_name("tiny", sliding_window=16, max_seq_length=128)
    torch.manual_seed(0)
    ours = Mistral(config).to(device)
    ours.init_weights()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder, dtype=torch.float32)
        theirs = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    tokens = torch.randint(3, config.vocab_size, (2, 97), device=device)
    with torch.no_grad():
        logits = ours(tokens)
        expected = theirs(tokens).logits
        loss = ours.loss(tokens[:, :-1], tokens[:, 1:])
        expected_loss = F.cross_entropy(expected[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    error = (logits.float() - expected.float()).abs().max().item()
    loss_error = abs(loss.item() - expected_loss.item())
    return {"logits_max_error": error, "loss_error": loss_error, "ok": error < 1e-4 and loss_error < 1e-5}


def layer_benchmarks(device: torch.device, card: str, dry_run: bool, out: Path) -> dict:
    """The 7B shape at 32K under each checkpointing choice, as deep as the plan fits, and the plan's choice
    ("auto") also with compiled blocks; each run's report (or its error) is written to gpu_runs.json as it ends
    (gpu_layers*.json are single runs of gpu.py, which benchmarks/memory_plan.py reads)."""
    from mistral_lightning.benchmarks import gpu

    seq, steps = (256, 1) if dry_run else (32768, 3)
    full = gpu.bench_model(dry_run, seq)
    capacity = gpu.device_memory(device, gpu.DRY_RUN_MEMORY_GB if dry_run else None)
    table = device_table(device.type, card)
    results: dict = {}
    plans: dict[str, gpu.PlannedRun] = {}  # the plan takes 15-100 s of host CPU per policy: once each
    for policy, compiled in LAYER_RUNS:
        name = policy + (" compiled" if compiled else "")
        try:
            if policy not in plans:
                plans[policy] = gpu.plan_run(full, seq, policy, None, capacity, HEADROOM, table)
            planned = plans[policy]
            report = gpu.measure(full, planned, seq, device, steps, compiled, lookup_peak_tflops(card))
            results[name] = {"ok": True, **report}
        except Exception:  # noqa: BLE001 - one policy running out of memory must not hide the others
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        (out / "gpu_runs.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def tiny_fit(device_type: str, out: Path) -> dict:
    """demo-data, preprocess and 20 steps of configs/tiny/finetune.yaml through the CLI on the device."""
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    cli = python_module_command("mistral_lightning")
    from mistral_lightning.tokenizer import default_tokenizer_path

    steps = [
        [*cli, "demo-data", "--out", str(work / "raw")],
        [
            *cli,
            "preprocess",
            "--input",
            str(work / "raw/alpaca/train.parquet"),
            "--tokenizer-model",
            str(default_tokenizer_path()),
            "--output-prefix",
            str(work / "demo_output/data/alpaca"),
            "--handler-name",
            "GeneralInstructionHandler",
            "--append-eod",
        ],
        [
            *cli,
            "fit",
            "--config",
            str(REPO / "configs/tiny/finetune.yaml"),
            f"--trainer.accelerator={device_type}",
            "--trainer.precision=32-true" if device_type == "cpu" else "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=20",
            "--trainer.val_check_interval=10",
            "--trainer.limit_val_batches=2",
        ],
    ]
    started = time.perf_counter()
    for command in steps:
        # The config's relative paths (demo_output/, runs/) land in the work folder.
        done = subprocess.run(command, capture_output=True, text=True, cwd=work, env=safe_path_env())
        if done.returncode != 0:
            return {"ok": False, "failed": " ".join(command[2:4]), "stderr_tail": done.stderr[-3000:]}
    metrics = sorted(Path(work, "runs").rglob("metrics.csv"))
    log_tail = metrics[-1].read_text().splitlines()[-6:] if metrics else []
    summary = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if "tokens/s" in line]
    return {
        "ok": True,
        "seconds": time.perf_counter() - started,
        "metrics_tail": log_tail,
        "summary": summary[-5:],
    }


def calibration(out: Path) -> dict:
    """`mistral-lightning plan calibrate` on the device: the measured table (calibration.yaml) that `plan
    --device_rates` takes, to set beside the shipped published-peak one."""
    table = out / "calibration.yaml"
    command = [*python_module_command("mistral_lightning"), "plan", "calibrate", "--processes", "1"]
    command += ["--out", str(table), "--overwrite"]
    done = subprocess.run(command, capture_output=True, text=True, env=safe_path_env())
    if done.returncode != 0:
        return {"ok": False, "stderr_tail": done.stderr[-3000:]}
    return {"ok": True, "table": str(table), "rates": yaml.safe_load(table.read_text())["processes"]}


def card_folder(name: str) -> str:
    """The device's folder under benchmarks/results/: "NVIDIA H200" -> "h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/<card>/ (a dry run: device_check_dry_run/)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run every section on the CPU with tiny shapes"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        raise SystemExit("no CUDA device; use --dry-run on the CPU")
    card = "CPU (dry run)" if args.dry_run else device_name(device)
    default_out = (
        Path("device_check_dry_run") if args.dry_run else REPO / "benchmarks/results" / card_folder(card)
    )
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": card,
        "torch": torch.__version__,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
    }
    # Cheapest first: a device lent for minutes still yields the parity checks if the 7B runs are cut short.
    sections = {
        "attention_parity": lambda: attention_parity(device),
        "model_parity_vs_transformers": lambda: model_parity(device),
        "tiny_fit": lambda: tiny_fit(device.type, out),
        "calibration": lambda: calibration(out),
        "layer_benchmark_7b_shape": lambda: layer_benchmarks(device, card, args.dry_run, out),
    }
    for name, run in sections.items():
        started = time.perf_counter()
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001 - a failing section is recorded and the next one still runs
            report[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        report[name + "_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: report[name]}, indent=1, default=str), flush=True)
        (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
