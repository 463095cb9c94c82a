"""Micro-benchmarks behind the choices in kernels/ whose figures benchmarks/results/kernel_choices.md keeps.

    python -m mistral_lightning.benchmarks.kernel_choices [--quick] [--only NAME ...] [--compile] [--out FILE.json]

Each measurement times one choice against its alternative on the bench config's shapes (one layer's
attention: 8 query heads, 2 KV heads, head size 64, window 512; bf16 unless a row says otherwise): the
best of --repeats runs after one warm-up run. Attention rows are one forward plus backward pass.
--threads sets torch's intra-op threads (on a shared machine, 1 avoids waiting for a time slice per thread).
--quick: shorter sequences and one repeat, seconds on 2 cores (it checks the script; its figures are rough).
--compile: also the compiled cross-entropy step (torch.compile; a C++ compiler and a minute or more).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from mistral_lightning.benchmarks.common import BENCH_CONFIG, machine
from mistral_lightning.kernels import banded_attention, cross_entropy
from mistral_lightning.kernels.attention import masked_attention
from mistral_lightning.kernels.banded_attention import banded_cpu_attention
from mistral_lightning.kernels.masks import band_mask
from mistral_lightning.kernels.packed_linear import PackedLinear, can_pack
from mistral_lightning.kernels.sdpa_attention import blocked_sdpa_band, sdpa, sdpa_causal
from mistral_lightning.kernels.swiglu import swiglu

WINDOW = BENCH_CONFIG.sliding_window
HEADS, KV_HEADS, HEAD_DIM = BENCH_CONFIG.num_heads, BENCH_CONFIG.num_kv_heads, BENCH_CONFIG.head_dim
Row = tuple[str, float, str]  # (what, value, unit)


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed runs after one warm-up (other work on the machine only adds time)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def attention_step(path, seq_len: int, dtype=torch.bfloat16, documents: int = 0, **kwargs) -> Callable:
    """One forward + backward of `path` over random [1, T, H, D] inputs (`documents` equal-length ones)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, seq_len, heads, HEAD_DIM, generator=gen, dtype=dtype).requires_grad_()
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    )
    document_ids = (torch.arange(seq_len) * documents // seq_len)[None] if documents else None
    grad = torch.randn_like(q)

    def run():
        out = path(q, k, v, WINDOW, document_ids=document_ids, **kwargs)
        torch.autograd.grad(out, (q, k, v), grad)

    return run


@contextmanager
def chunk_queries(value: int):
    saved, banded_attention.CHUNK_QUERIES = banded_attention.CHUNK_QUERIES, value
    try:
        yield
    finally:
        banded_attention.CHUNK_QUERIES = saved


def first_window(args) -> list[Row]:
    """T = W: causal SDPA (which skips the upper triangle) against the banded kernel."""
    return [
        (f"T={WINDOW} {path.__name__}", best_ms(attention_step(path, WINDOW), args.repeats), "ms")
        for path in (sdpa_causal, banded_cpu_attention)
    ]


def past_the_window(args) -> list[Row]:
    """T > W: blocked SDPA against the banded kernel, in bf16, fp32, and bf16 with 8 packed documents."""
    seq_len = 1024 if args.quick else 2048
    rows = []
    for label, dtype, documents in [
        ("bf16", torch.bfloat16, 0),
        ("fp32", torch.float32, 0),
        ("bf16 8 docs", torch.bfloat16, 8),
    ]:
        for path in (blocked_sdpa_band, banded_cpu_attention):
            run = attention_step(path, seq_len, dtype, documents)
            rows.append((f"T={seq_len} {label} {path.__name__}", best_ms(run, args.repeats), "ms"))
    return rows


def banded_query_block(args) -> list[Row]:
    seq_len = 1024 if args.quick else 2048
    return [
        (
            f"T={seq_len} query_block={block}",
            best_ms(attention_step(banded_cpu_attention, seq_len, query_block=block), args.repeats),
            "ms",
        )
        for block in (32, 64, 128, 256)
    ]


def banded_chunk_queries(args) -> list[Row]:
    rows = []
    for seq_len in (2048,) if args.quick else (2048, 8192):
        for chunk in (512, 4096):
            with chunk_queries(chunk):
                run = attention_step(banded_cpu_attention, seq_len)
                rows.append((f"T={seq_len} CHUNK_QUERIES={chunk}", best_ms(run, args.repeats), "ms"))
    return rows


def sdpa_query_block(args) -> list[Row]:
    rows = []
    for seq_len in (2048,) if args.quick else (2048, 8192):
        for block in (128, 256, 512):
            run = attention_step(blocked_sdpa_band, seq_len, query_block=block)
            rows.append((f"T={seq_len} query_block={block}", best_ms(run, args.repeats), "ms"))
    return rows


def flash_kernel_vs_bmm(args) -> list[Row]:
    """bf16 GFLOP/s of SDPA's CPU kernel with an explicit [T, T] band mask, and of two plain bmm's with the
    same shapes (Q K^T and P V); forward only, FLOPs counted over the whole [T, T] score matrix."""
    seq_len = 1024 if args.quick else 2048
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(HEADS, seq_len, HEAD_DIM, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    positions = torch.arange(seq_len)
    mask = band_mask(positions, positions, WINDOW)
    probs = torch.rand(HEADS, seq_len, seq_len, generator=gen).to(torch.bfloat16)
    flops = 2 * 2 * HEADS * seq_len * seq_len * HEAD_DIM
    with torch.no_grad():
        sdpa_ms = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.repeats)
        bmm_ms = best_ms(lambda: (torch.bmm(q, k.transpose(1, 2)), torch.bmm(probs, v)), args.repeats)
    return [
        (f"T={seq_len} SDPA with a band mask", flops / sdpa_ms / 1e6, "GFLOP/s"),
        (f"T={seq_len} bmm, same shapes", flops / bmm_ms / 1e6, "GFLOP/s"),
    ]


def cached_attention(args) -> list[Row]:
    """One decoded query over 512 cached keys: SDPA in bf16 against masked_attention (upcast to fp32)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, HEADS, HEAD_DIM, generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, WINDOW, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(1, 1, 1, WINDOW, dtype=torch.bool)
    repeats = 20 * args.repeats
    with torch.no_grad():
        return [
            ("bf16 SDPA", 1000 * best_ms(lambda: sdpa(q, k, v, mask), repeats), "us"),
            (
                "masked_attention (fp32)",
                1000 * best_ms(lambda: masked_attention(q, k, v, mask), repeats),
                "us",
            ),
        ]


def packed_linear(args) -> list[Row]:
    """One row through the bench config's LM head (hidden -> vocab): F.linear against PackedLinear."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        linear = torch.nn.Linear(BENCH_CONFIG.hidden_size, BENCH_CONFIG.vocab_size, bias=False).to(dtype)
        if not can_pack(linear.weight):
            continue
        x = torch.randn(1, BENCH_CONFIG.hidden_size, dtype=dtype)
        packed = PackedLinear(linear)
        with torch.no_grad():
            for name, module in (("F.linear", linear), ("PackedLinear", packed)):
                run = partial(module, x)
                rows.append((f"{str(dtype)[6:]} {name}", 1000 * best_ms(run, 10 * args.repeats), "us"))
    return rows


def cross_entropy_chunk(args) -> list[Row]:
    """Loss and softmax - one-hot of one [chunk, vocab] bf16 logits block: the in-place eager form, the
    fusable form in eager, and (--compile) the fusable form compiled."""
    chunk = 256 if args.quick else 1024
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(chunk, BENCH_CONFIG.vocab_size, generator=gen).to(torch.bfloat16)
    target = torch.randint(0, BENCH_CONFIG.vocab_size, (chunk,), generator=gen)
    forms = {
        "in-place eager": cross_entropy._loss_and_logit_grad_in_place,
        "fusable eager": cross_entropy._loss_and_logit_grad_fusable,
    }
    if args.compile:
        forms["fusable compiled"] = cross_entropy._compiled
    return [
        (
            f"[{chunk}, {BENCH_CONFIG.vocab_size}] {name}",
            best_ms(lambda f=form: f(logits, target, torch.float32, torch.bfloat16), args.repeats),
            "ms",
        )
        for name, form in forms.items()
    ]


def head_gradient_accumulation(args) -> list[Row]:
    """The LM head's weight gradient over a 2K step (two 1024-row chunks): an fp32 buffer (fill, add per
    chunk, cast at the end) against accumulating in bf16 with addmm_ (what cross_entropy does)."""
    rows, vocab, hidden = 256 if args.quick else 1024, BENCH_CONFIG.vocab_size, BENCH_CONFIG.hidden_size
    gen = torch.Generator().manual_seed(0)
    chunks = [
        (
            torch.randn(rows, vocab, generator=gen).to(torch.bfloat16),
            torch.randn(rows, hidden, generator=gen).to(torch.bfloat16),
        )
        for _ in range(2)
    ]

    def fp32_buffer():
        total = torch.zeros(vocab, hidden)
        for grad_logits, chunk in chunks:
            total += grad_logits.t() @ chunk
        return total.to(torch.bfloat16)

    def addmm():
        total = chunks[0][0].t() @ chunks[0][1]
        for grad_logits, chunk in chunks[1:]:
            total.addmm_(grad_logits.t(), chunk)
        return total

    return [
        (f"2 x {rows} rows {name}", best_ms(fn, args.repeats), "ms")
        for name, fn in (("fp32 buffer", fp32_buffer), ("bf16 addmm_", addmm))
    ]


def swiglu_saved_memory(args) -> list[Row]:
    """Bytes kept for backward by one layer's SwiGLU: autograd's silu(gate) * up against kernels.swiglu."""
    tokens = 8192 if args.quick else 32768
    gen = torch.Generator().manual_seed(0)
    gate, up = (
        torch.randn(tokens, BENCH_CONFIG.intermediate_size, generator=gen).to(torch.bfloat16).requires_grad_()
        for _ in range(2)
    )

    def saved_bytes(fn) -> int:
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(gate, up)
        return sum(storages.values())

    return [
        (f"{tokens} tokens F.silu(gate) * up", saved_bytes(lambda g, u: F.silu(g) * u) / 1e6, "MB"),
        (f"{tokens} tokens kernels.swiglu", saved_bytes(swiglu) / 1e6, "MB"),
    ]


MEASUREMENTS = {
    fn.__name__: fn
    for fn in (
        first_window,
        past_the_window,
        banded_query_block,
        banded_chunk_queries,
        sdpa_query_block,
        flash_kernel_vs_bmm,
        cached_attention,
        packed_linear,
        cross_entropy_chunk,
        head_gradient_accumulation,
        swiglu_saved_memory,
    )
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short sequences, one repeat")
    parser.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS), help="run only these")
    parser.add_argument("--compile", action="store_true", help="also time the compiled cross-entropy step")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 5, 1 with --quick)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--out", type=Path, help="also write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "quick": args.quick, "measurements": {}}
    print(json.dumps(results["machine"]))
    for name in args.only or MEASUREMENTS:
        rows = MEASUREMENTS[name](args)
        results["measurements"][name] = rows
        print(f"\n{name}")
        for what, value, unit in rows:
            print(f"  {what:<40} {value:10.1f} {unit}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
