"""Exact causal sliding-window attention for the CPU: dense matmuls over the band only, recomputed in backward.

PyTorch's CPU flash kernel computes every score tile an explicit mask touches, and in bf16 runs well below a
plain bf16 `bmm` of the same shapes (benchmarks/results/kernel_choices.md). Here queries are cut into blocks
of `query_block` (DEFAULT_QUERY_BLOCK); block i meets the `keys` = S * block keys ending at its last query (S
blocks, enough for the window), so each score matrix is one dense `baddbmm` with the band as an additive bias,
then a fused softmax and a `bmm`. All query heads sharing a KV head go into one matmul (GQA without repeating
k/v). Packed documents add a same-document test to each block's mask. Only q, k and v are saved: backward
recomputes the probabilities block by block, so memory stays linear in T. Blocks are processed in chunks of
about CHUNK_QUERIES queries, which bounds the transient score matrices and keeps them in cache.

Both passes are registered as custom ops, so torch.compile calls these kernels instead of re-deriving the
softmax in generated code (which was slower on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mistral_lightning.kernels.masks import additive_mask, band_mask

# Queries per block: fewer wasted scores (smaller) against larger matmuls; the fastest measured at W = 512
# (benchmarks/results/kernel_choices.md).
DEFAULT_QUERY_BLOCK = 64
# Queries per chunk: small enough that a chunk's scores stay in cache between the matmul, the softmax and the
# next matmul (benchmarks/results/kernel_choices.md).
CHUNK_QUERIES = 512
# Document ids of the zero keys before position 0 and of the padding after T (real ids are >= -1: -1 pads).
_BEFORE_START_DOCUMENT, _AFTER_END_DOCUMENT = -3, -2


@dataclass(frozen=True)
class _Band:
    """How [B, T, H, D] tensors are cut into query blocks and their key windows."""

    batch: int
    seq_len: int
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    block: int
    num_blocks: int
    segments: int  # key window of a block, in blocks
    window: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, window: int, block: int) -> _Band:
        batch, seq_len, heads, head_dim = q.shape
        return cls(
            batch=batch,
            seq_len=seq_len,
            kv_heads=k.shape[2],
            group=heads // k.shape[2],
            head_dim=head_dim,
            block=block,
            num_blocks=-(-seq_len // block),
            segments=-(-(block + window - 1) // block),
            window=window,
        )

    @property
    def keys(self) -> int:
        return self.segments * self.block

    @property
    def left_pad(self) -> int:
        """Zero keys in front of position 0, so that every block has a full-size key window."""
        return self.keys - self.block

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block

    def chunks(self):
        """(first block, end block) ranges: the head blocks whose windows start before position 0 alone
        (their bias differs per block), then the rest in chunks of about CHUNK_QUERIES queries."""
        head = min(self.segments - 1, self.num_blocks)
        if head:
            yield 0, head
        step = max(1, CHUNK_QUERIES // self.block)
        for start in range(head, self.num_blocks, step):
            yield start, min(start + step, self.num_blocks)

    def bias(
        self, start: int, end: int, like: torch.Tensor, documents: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """Additive mask (0 / -inf) in like's dtype, broadcastable to a chunk's scores [B * n * Hkv, G * block,
        keys]."""
        dtype, device = like.dtype, like.device
        shared = start >= self.segments - 1  # past the head, the band's mask is the same for every block
        blocks = torch.arange(
            self.segments - 1 if shared else start, self.segments if shared else end, device=device
        )
        query = blocks[:, None] * self.block + torch.arange(self.block, device=device)
        key = blocks[:, None] * self.block - self.left_pad + torch.arange(self.keys, device=device)
        visible = band_mask(query, key, self.window) & (key >= 0)[:, None, :]  # [blocks, block, keys]
        if documents is None and shared:
            return additive_mask(visible[0], dtype).repeat(self.group, 1)
        if documents is not None:
            query_docs, key_docs = documents
            visible = visible & (query_docs[:, start:end, :, None] == key_docs[:, start:end, None, :])
        bias = additive_mask(visible.expand(self.batch, end - start, self.block, self.keys), dtype)
        # Chunk rows are ordered (batch, block, kv head), each row (query head in the group, query): see
        # `_blocked_queries`.
        bias = bias[:, :, None, None].expand(-1, -1, self.kv_heads, self.group, -1, -1)
        return bias.reshape(-1, self.group * self.block, self.keys)

    def documents(self, document_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Document ids of each block's queries [B, nb, block] and keys [B, nb, keys]. Keys before position 0
        get an id no query has; padding after T gets its own, so a padding query still sees itself."""
        if document_ids is None:
            return None
        pad = self.padded_len - self.seq_len
        queries = F.pad(document_ids, (0, pad), value=_AFTER_END_DOCUMENT)
        keys = F.pad(document_ids, (self.left_pad, 0), value=_BEFORE_START_DOCUMENT)
        keys = F.pad(keys, (0, pad), value=_AFTER_END_DOCUMENT)
        return queries.view(self.batch, self.num_blocks, self.block), keys.unfold(1, self.keys, self.block)


def _blocked_queries(x: torch.Tensor, band: _Band) -> torch.Tensor:
    """[B, T, Hq, D] -> [B, nb, Hkv, G * block, D]: each KV head's query heads stacked, block by block."""
    x = F.pad(x, (0, 0, 0, 0, 0, band.padded_len - band.seq_len))
    x = x.reshape(band.batch, band.num_blocks, band.block, band.kv_heads, band.group, band.head_dim)
    return x.permute(0, 1, 3, 4, 2, 5).reshape(
        band.batch, band.num_blocks, band.kv_heads, band.group * band.block, band.head_dim
    )


def _unblocked_queries(x: torch.Tensor, band: _Band) -> torch.Tensor:
    """Inverse of `_blocked_queries`, contiguous."""
    x = x.reshape(band.batch, band.num_blocks, band.kv_heads, band.group, band.block, band.head_dim)
    x = x.permute(0, 1, 4, 2, 3, 5).reshape(band.batch, band.padded_len, -1, band.head_dim)
    return x[:, : band.seq_len].contiguous()


def _key_windows(x: torch.Tensor, band: _Band) -> torch.Tensor:
    """[B, T, Hkv, D] -> overlapping view [B, nb, Hkv, keys, D]: block i's keys, zero-padded in front."""
    x = F.pad(x, (0, 0, 0, 0, band.left_pad, band.padded_len - band.seq_len))
    return x.unfold(1, band.keys, band.block).transpose(-1, -2)


class _WindowGradient:
    """Sums gradients of overlapping key windows back onto the keys, in fp32 for half-precision inputs."""

    def __init__(self, band: _Band, like: torch.Tensor) -> None:
        self.band = band
        dtype = torch.promote_types(like.dtype, torch.float32)
        segments = band.num_blocks + band.segments - 1
        self.total = like.new_zeros(
            band.batch, segments, band.kv_heads, band.block, band.head_dim, dtype=dtype
        )

    def add(self, start: int, window_grad: torch.Tensor) -> None:
        """window_grad: [B * n * Hkv, keys, D] for blocks start .. start + n."""
        band = self.band
        grad = window_grad.view(band.batch, -1, band.kv_heads, band.segments, band.block, band.head_dim)
        blocks = grad.shape[1]
        for segment in range(band.segments):
            self.total[:, start + segment : start + segment + blocks] += grad[:, :, :, segment]

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        band = self.band
        total = self.total.transpose(2, 3).reshape(band.batch, -1, band.kv_heads, band.head_dim)
        return total[:, band.left_pad : band.left_pad + band.seq_len].to(dtype).contiguous()


def _rows(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Blocks start..end of a [B, nb, Hkv, M, D] tensor as a batch of matrices [B * n * Hkv, M, D]."""
    return x[:, start:end].reshape(-1, *x.shape[-2:])


def _probabilities(q_rows, k_rows, bias, scale):
    return torch.softmax(torch.baddbmm(bias, q_rows, k_rows.transpose(1, 2), alpha=scale), dim=-1)


def _blocked_inputs(q, k, v, document_ids, window, block):
    """What both passes start from: the layout, blocked queries, key/value windows and windowed document ids."""
    band = _Band.of(q, k, window, block)
    keys, values = _key_windows(k, band), _key_windows(v, band)
    return band, _blocked_queries(q, band), keys, values, band.documents(document_ids)


@torch.library.custom_op("mistral_lightning::banded_attention", mutates_args=())
def _banded_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    window: int,
    block: int,
) -> torch.Tensor:
    band, queries, keys, values, documents = _blocked_inputs(q, k, v, document_ids, window, block)
    out = torch.empty_like(queries)
    for start, end in band.chunks():
        bias = band.bias(start, end, q, documents)
        probs = _probabilities(_rows(queries, start, end), _rows(keys, start, end), bias, band.scale)
        out[:, start:end] = torch.bmm(probs, _rows(values, start, end)).view(out[:, start:end].shape)
    return _unblocked_queries(out, band)


@_banded_attention_forward.register_fake
def _(q, k, v, document_ids, window, block):
    return q.new_empty(q.shape)


@torch.library.custom_op("mistral_lightning::banded_attention_backward", mutates_args=())
def _banded_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    window: int,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    band, queries, keys, values, documents = _blocked_inputs(q, k, v, document_ids, window, block)
    grad_out = _blocked_queries(grad.to(q.dtype), band)
    grad_q = torch.empty_like(queries)
    grad_k, grad_v = _WindowGradient(band, k), _WindowGradient(band, v)
    for start, end in band.chunks():
        q_rows, k_rows, v_rows = (
            _rows(queries, start, end),
            _rows(keys, start, end),
            _rows(values, start, end),
        )
        grad_rows = _rows(grad_out, start, end)
        probs = _probabilities(q_rows, k_rows, band.bias(start, end, q, documents), band.scale)
        grad_v.add(start, torch.bmm(probs.transpose(1, 2), grad_rows))
        # The fused softmax backward autograd itself uses: probs * (grad_probs - rowsum(grad_probs * probs)).
        grad_scores = torch._softmax_backward_data(
            torch.bmm(grad_rows, v_rows.transpose(1, 2)), probs, -1, probs.dtype
        )
        grad_q[:, start:end] = (
            torch.bmm(grad_scores, k_rows).mul_(band.scale).view(grad_q[:, start:end].shape)
        )
        grad_k.add(start, torch.bmm(grad_scores.transpose(1, 2), q_rows).mul_(band.scale))
    return _unblocked_queries(grad_q, band), grad_k.result(k.dtype), grad_v.result(v.dtype)


@_banded_attention_backward.register_fake
def _(grad, q, k, v, document_ids, window, block):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, document_ids, ctx.window, ctx.block = inputs
    ctx.save_for_backward(q, k, v, document_ids)


def _backward(ctx, grad):
    q, k, v, document_ids = ctx.saved_tensors
    grads = _banded_attention_backward(grad, q, k, v, document_ids, ctx.window, ctx.block)
    return (*grads, None, None, None)


_banded_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def banded_cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    document_ids: torch.Tensor | None = None,
    query_block: int | None = None,
) -> torch.Tensor:
    """Causal attention over the last `window` positions of the query's own document (`document_ids` [B, T],
    optional); [B, T, Hq, D] q, [B, T, Hkv, D] k/v; `query_block` queries per block (DEFAULT_QUERY_BLOCK)."""
    return _banded_attention_forward(q, k, v, document_ids, window, query_block or DEFAULT_QUERY_BLOCK)
