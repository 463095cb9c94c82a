"""A dense masked attention reference, random q/k/v, packed documents, and the profiler's peak of allocated bytes."""

from __future__ import annotations

import json
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile


def dense_reference(q, k, v, window, document_ids=None):
    """Plain softmax attention with the full [T, T] mask written out from the definition."""
    seq_len, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    mask = (j <= i) & (j > i - window if window else torch.ones_like(j, dtype=torch.bool))
    mask = mask[None, None].expand(q.shape[0], 1, seq_len, seq_len)
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def packed_documents(seq_len: int) -> torch.Tensor:
    """Document ids [2, seq_len]: row 0 with boundaries at 12, 24 (edges of shards of 12) and 30, row 1 with one at
    20 (inside the halo of the shard from 24)."""
    rows = torch.zeros(2, seq_len, dtype=torch.long)
    for boundary in (12, 24, 30):
        rows[0, boundary:] += 1
    rows[1, 20:] += 1
    return rows


def random_qkv(seq_len, heads=4, kv_heads=2, head_dim=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = (
        (batch, seq_len, heads, head_dim),
        (batch, seq_len, kv_heads, head_dim),
        (batch, seq_len, kv_heads, head_dim),
    )
    return [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for shape in shapes]


def peak_allocated_bytes(fn) -> int:
    """Peak CPU bytes allocated while fn runs, from the profiler's allocation events (not time)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    live = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak
