"""Prefill and decode speed and peak memory: our `generate` against transformers' `generate`.

    python -m mistral_lightning.benchmarks.generation_speed [--prompt-tokens 128] [--new-tokens 128] [--batch 1] [--dtype bfloat16]

One random model of the bench config (benchmarks/common.py; window 512, bf16 like the training bench,
or --dtype float32) is saved once. Ours is loaded as `mistral-lightning generate` loads it
(`load_model`, which packs the linear weights for oneDNN on the CPU); transformers' MistralForCausalLM
uses its default SDPA attention. Each engine then runs greedy decoding in its own process, so peak memory (VmHWM, the kernel's
resident high-water mark, reset after loading) is its own; the engines alternate over --rounds
processes. Times are the best of --repeats runs:
prefill tokens/s = batch * prompt tokens / time to the first new token;
decode tokens/s = batch * (new tokens - 1) / (time for all new tokens - time to the first).
Both run with --threads intra-op threads (default 1). The script prints a table, JSON, and whether
both produced the same tokens (in bf16 the engines round differently, so a near-tie in a random
model's logits can flip a token; in float32 they agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mistral_lightning.benchmarks.common import BENCH_CONFIG
from mistral_lightning.child_processes import python_module_command, safe_path_env


def _memory_kb(field: str) -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0])


def _best_time(run, repeats: int) -> tuple[float, list[list[int]]]:
    best, tokens = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        best = min(best, time.perf_counter() - start)
    return best, tokens


def _engine(name: str, folder: str, dtype: str):
    """A function (prompts, new tokens) -> new token ids, for our model or transformers'."""
    if name == "ours":
        from mistral_lightning.generation import generate
        from mistral_lightning.generation.loading import load_model

        model = load_model(folder, device="cpu", dtype=dtype)
        return lambda prompts, new: generate(model, prompts, new, eos_id=None)
    import transformers

    model = transformers.MistralForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def run(prompts, new):
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1] :].tolist()

    return run


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    run = _engine(args.engine, args.folder, args.dtype)
    prompts = torch.randint(
        3, 32000, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    prompts = prompts.tolist()
    run(prompts, 8)  # warm-up
    # Writing 5 to clear_refs resets VmHWM, so the peak below is that of generation, not of loading.
    Path("/proc/self/clear_refs").write_text("5")
    loaded_kb = _memory_kb("VmRSS")
    first, _ = _best_time(lambda: run(prompts, 1), args.repeats)
    total, tokens = _best_time(lambda: run(prompts, args.new_tokens), args.repeats)
    result = {
        "engine": args.engine,
        "prefill_tokens_per_s": args.batch * args.prompt_tokens / first,
        "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / (total - first),
        "peak_rss_mb": _memory_kb("VmHWM") / 1024,
        "peak_above_loaded_mb": (_memory_kb("VmHWM") - loaded_kb) / 1024,
        "tokens": tokens,
    }
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per engine, alternating")
    # One thread by default: on a small shared CPU, an intra-op thread pool mostly measures contention.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--engine", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        return child(args)
    common = [f"--prompt-tokens={args.prompt_tokens}", f"--new-tokens={args.new_tokens}"]
    common += [f"--batch={args.batch}", f"--repeats={args.repeats}", f"--threads={args.threads}"]
    common += [f"--dtype={args.dtype}"]
    with tempfile.TemporaryDirectory() as tmp:
        from mistral_lightning.model import Mistral

        model = Mistral(BENCH_CONFIG)
        model.init_weights(torch.Generator().manual_seed(0))
        model.save_pretrained(tmp, dtype=getattr(torch, args.dtype))
        del model
        # Engines alternate over rounds and keep their best round, so load drift on a shared machine
        # does not favour whichever ran first.
        rounds: dict[str, list[dict]] = {"ours": [], "transformers": []}
        for _ in range(args.rounds):
            for engine in rounds:
                command = python_module_command(
                    "mistral_lightning.benchmarks.generation_speed", f"--engine={engine}", f"--folder={tmp}"
                )
                out = subprocess.run(
                    command + common, check=True, capture_output=True, text=True, env=safe_path_env()
                ).stdout
                rounds[engine].append(json.loads(out.strip().splitlines()[-1]))
    results = {engine: max(runs, key=lambda r: r["decode_tokens_per_s"]) for engine, runs in rounds.items()}
    ours_tokens, their_tokens = results["ours"].pop("tokens"), results["transformers"].pop("tokens")
    same = ours_tokens == their_tokens
    # Tokens every row agrees on before the engines' first difference.
    agreed = min(
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
        for x, y in zip(ours_tokens, their_tokens)
    )
    print(
        f"{'engine':<13} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12} {'above loaded MB':>16}"
    )
    for name, r in results.items():
        print(
            f"{name:<13} {r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f} "
            f"{r['peak_rss_mb']:>12.1f} {r['peak_above_loaded_mb']:>16.1f}"
        )
    speedup = results["ours"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]
    print(
        f"decode speed-up over transformers: {speedup:.2f}x (target >= 1.5x); same tokens: {same} "
        f"(the first {agreed} of {args.new_tokens} agree)"
    )
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("engine", "folder")},
        "results": results,
    }
    print(json.dumps(summary | {"decode_speedup": speedup, "same_tokens": same, "tokens_agreed": agreed}))


if __name__ == "__main__":
    main()
