"""A stand-in for torch_npu: the documented signatures and limits of the operators our kernels call, computing
what the documentation says each computes.

Ascend hardware is out of reach here, so the NPU code paths are checked against this fake. Each operator takes
exactly the parameters of its documented prototype (Ascend Extension for PyTorch API reference: npu_fusion_attention,
npu_rms_norm, npu_rotary_mul, npu_swiglu), so a misspelled keyword is a TypeError as with the real binding; it
records its call and raises ValueError where the documentation sets a limit. What the fake does not compute
(other layouts and sparse modes, dropout, pse, prefix) raises NotImplementedError instead of guessing.

npu_fusion_attention runs as one registered operator, `npu::npu_fusion_attention`, as the real one does, so autograd,
activation-checkpointing policies and dispatch modes see one opaque operator, not its matmuls.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------ documented limits
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
SPARSE_MODES = range(9)
COMPRESSED_MASK_MODES = (2, 3, 4, 7, 8)  # take the compressed 2048x2048 triu(1) mask
MAX_VARLEN_SEQUENCES = 1024  # "actual_seq_qlen ... varlen场景下长度最大支持1K"
MAX_VARLEN_TOKENS = 2**20  # T (B*S) 1..1M
MAX_HEAD_DIM = 768
MAX_HEADS = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_TOCKENS = 2147483647


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"torch_npu (fake): {message}")


# ------------------------------------------------------------------ the attention operator
def _visible(seq_q: int, seq_k: int, sparse_mode: int, pre: int, nxt: int, masked: bool) -> torch.Tensor:
    """Which keys each query sees: band mode 4 keeps i - pre <= j <= i + next, mode 3 is causal from the bottom-right
    corner, mode 2 from the top-left; without atten_mask every mode computes all keys."""
    if not masked:
        return torch.ones(seq_q, seq_k, dtype=torch.bool)
    i = torch.arange(seq_q)[:, None]
    j = torch.arange(seq_k)[None, :]
    if sparse_mode == 2:
        return j <= i
    i = i + (seq_k - seq_q)  # modes 3 and 4 count from the bottom-right corner
    if sparse_mode == 3:
        return j <= i
    return (j >= i - pre) & (j <= i + nxt)


def _attention(query, key, value, scale, visible):
    """[B, S, N, D] attention with a [Sq, Sk] visibility mask; key/value heads shared by query-head groups."""
    groups = query.shape[2] // key.shape[2]
    k = key.repeat_interleave(groups, dim=2).transpose(1, 2)
    v = value.repeat_interleave(groups, dim=2).transpose(1, 2)
    scores = query.transpose(1, 2) @ k.transpose(-1, -2) * scale
    probs = scores.masked_fill(~visible.to(scores.device), float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2)


def _compute(query, key, value, input_layout, masked, scale, pre, nxt, qlen, kvlen, sparse_mode):
    if input_layout == "BSND":
        visible = _visible(query.shape[1], key.shape[1], sparse_mode, pre, nxt, masked)
        return _attention(query, key, value, scale, visible)
    pieces = []
    for q_start, q_end, k_start, k_end in zip([0, *qlen[:-1]], qlen, [0, *kvlen[:-1]], kvlen):
        visible = _visible(q_end - q_start, k_end - k_start, sparse_mode, pre, nxt, masked)
        piece = (
            x[None, start:end]
            for x, start, end in ((query, q_start, q_end), (key, k_start, k_end), (value, k_start, k_end))
        )
        pieces.append(_attention(*piece, scale, visible)[0])
    return torch.cat(pieces)


@torch.library.custom_op("npu::npu_fusion_attention", mutates_args=())
def _fusion_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    input_layout: str,
    masked: bool,
    scale: float,
    pre_tockens: int,
    next_tockens: int,
    actual_seq_qlen: list[int] | None,
    actual_seq_kvlen: list[int] | None,
    sparse_mode: int,
) -> torch.Tensor:
    return _compute(
        query, key, value, input_layout, masked, scale, pre_tockens, next_tockens, actual_seq_qlen,
        actual_seq_kvlen, sparse_mode,
    )  # fmt: skip


@_fusion_attention_op.register_fake
def _(query, key, value, *args):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.arguments = inputs[3:]


def _fusion_attention_backward(ctx, grad):
    """The gradient of the documented computation, by autograd over it (the real operator has its own kernel)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in ctx.saved_tensors]
        out = _compute(*leaves, *ctx.arguments)
        grads = torch.autograd.grad(out, leaves, grad)
    return (*grads, *(None for _ in ctx.arguments))


_fusion_attention_op.register_autograd(_fusion_attention_backward, setup_context=_save_for_backward)


def _check_cumulative(name: str, lengths, tokens: int) -> list[int]:
    _require(lengths is not None, f"input_layout TND needs {name}")
    lengths = list(lengths)
    while len(lengths) > 1 and lengths[-1] == 0:  # trailing zeros: batches left out of the computation
        lengths.pop()
    _require(
        1 <= len(lengths) <= MAX_VARLEN_SEQUENCES,
        f"{name} has {len(lengths)} entries; the TND layout takes 1 to {MAX_VARLEN_SEQUENCES} sequences",
    )
    _require(all(b >= a for a, b in zip([0, *lengths], lengths)), f"{name} must be cumulative: {lengths}")
    _require(lengths[-1] == tokens, f"{name} ends at {lengths[-1]}, the tensors have {tokens} tokens")
    return lengths


def _check_compressed_mask(mask: torch.Tensor, checked: dict) -> None:
    """The compressed mask is triu(ones(2048, 2048), 1), True where masked; each mask object is read once."""
    _require(mask.dtype in (torch.bool, torch.uint8), f"atten_mask must be bool or uint8, got {mask.dtype}")
    _require(
        tuple(mask.shape) == (2048, 2048), f"sparse modes 2-4, 7, 8 take a 2048x2048 mask, got {mask.shape}"
    )
    if checked.get(id(mask)) is not mask:
        expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=mask.device), 1)
        _require(torch.equal(mask.bool(), expected), "the compressed mask must be triu(ones(2048, 2048), 1)")
        checked[id(mask)] = mask


# ------------------------------------------------------------------ the module
class FakeTorchNpu(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.calls: list[tuple[str, dict]] = []
        self._checked_masks: dict[int, torch.Tensor] = {}

    def npu_fusion_attention(
        fake,
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=DEFAULT_TOCKENS,
        next_tockens=DEFAULT_TOCKENS,
        inner_precise=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
        softmax_layout="",
    ):
        arguments = dict(locals())
        for name in ("fake", "query", "key", "value"):
            arguments.pop(name)
        fake.calls.append(("npu_fusion_attention", arguments))
        _require(input_layout in LAYOUTS, f"input_layout {input_layout!r} is not one of {LAYOUTS}")
        if input_layout not in ("BSND", "TND"):
            raise NotImplementedError(f"the fake computes the BSND and TND layouts, not {input_layout}")
        _require(
            query.dtype == key.dtype == value.dtype and query.dtype in DTYPES,
            f"query, key and value must share one of {DTYPES}; got {query.dtype}, {key.dtype}, {value.dtype}",
        )
        _require(key.shape == value.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
        rank = 3 if input_layout == "TND" else 4
        _require(query.dim() == key.dim() == rank, f"layout {input_layout} takes {rank}-D tensors")
        heads, kv_heads = query.shape[-2], key.shape[-2]
        _require(head_num == heads, f"head_num={head_num}, but query has {heads} heads")
        _require(
            1 <= heads <= MAX_HEADS and heads % kv_heads == 0, f"{heads} query heads over {kv_heads} KV heads"
        )
        _require(query.shape[-1] == key.shape[-1] <= MAX_HEAD_DIM, "head dims must match and be at most 768")
        _require(pse is None and prefix is None, "the fake computes no pse and no prefix")
        _require(padding_mask is None, "padding_mask is not supported")
        _require(0 < keep_prob <= 1, f"keep_prob must be in (0, 1], got {keep_prob}")
        if keep_prob < 1:
            raise NotImplementedError("the fake computes no dropout")
        _require(inner_precise in (0, 1, 2), f"inner_precise {inner_precise} is not 0, 1 or 2")
        _require(softmax_layout in ("", "TND"), f"softmax_layout {softmax_layout!r} is not '' or 'TND'")
        _require(sparse_mode in SPARSE_MODES, f"sparse_mode {sparse_mode} is not 0-8")
        if input_layout == "TND":
            _require(sparse_mode != 5, "sparse_mode 5 is not supported with TND (varlen)")
            _require(query.shape[0] <= MAX_VARLEN_TOKENS, f"TND takes at most {MAX_VARLEN_TOKENS} tokens")
            actual_seq_qlen = _check_cumulative("actual_seq_qlen", actual_seq_qlen, query.shape[0])
            actual_seq_kvlen = _check_cumulative("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
            _require(len(actual_seq_qlen) == len(actual_seq_kvlen), "the two length lists differ in length")
        else:
            _require(sparse_mode not in (7, 8), f"sparse_mode {sparse_mode} is only for TND (varlen)")
            _require(softmax_layout == "", "softmax_layout is only for TND")
            _require(query.shape[0] == key.shape[0], "query and key batch sizes differ")
        if atten_mask is not None:
            if sparse_mode not in COMPRESSED_MASK_MODES:
                raise NotImplementedError(f"the fake computes sparse modes {COMPRESSED_MASK_MODES[:3]} only")
            if sparse_mode in (7, 8):
                raise NotImplementedError("the fake computes no split-sequence (7, 8) modes")
            _check_compressed_mask(atten_mask, fake._checked_masks)
            if sparse_mode == 4:
                _require(pre_tockens + next_tockens >= 0, "the band of pre_tockens and next_tockens is empty")
        out = _fusion_attention_op(
            query, key, value, input_layout, atten_mask is not None, float(scale), pre_tockens, next_tockens,
            actual_seq_qlen, actual_seq_kvlen, sparse_mode,
        )  # fmt: skip
        softmax_max = softmax_sum = softmax_out = query.new_empty(0, dtype=torch.float32)
        return (out, softmax_max, softmax_sum, softmax_out, 0, 0, 0)

    def npu_rms_norm(fake, self, gamma, epsilon=1e-06):
        fake.calls.append(("npu_rms_norm", dict(epsilon=epsilon)))
        _require(self.dtype in DTYPES, f"npu_rms_norm takes {DTYPES}, got {self.dtype}")
        _require(
            gamma.dtype == self.dtype, f"gamma ({gamma.dtype}) must have the input's dtype ({self.dtype})"
        )
        _require(2 <= self.dim() <= 8, f"npu_rms_norm takes 2-8 dimensions, got {self.dim()}")
        _require(self.shape[-gamma.dim() :] == gamma.shape, "gamma must match the input's last dimensions")
        rstd = torch.rsqrt(self.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return ((self.float() * rstd).to(self.dtype) * gamma, rstd)

    def npu_rotary_mul(fake, input, r1, r2, rotary_mode="half"):
        fake.calls.append(("npu_rotary_mul", dict(rotary_mode=rotary_mode)))
        _require(
            rotary_mode in ("half", "interleave"), f"rotary_mode {rotary_mode!r} is not half or interleave"
        )
        if rotary_mode != "half":
            raise NotImplementedError("the fake computes the half (rotate-half) mode")
        _require(input.dim() == r1.dim() == r2.dim() == 4, "npu_rotary_mul takes 4-D input, r1 and r2")
        _require(all(x.dtype in DTYPES for x in (input, r1, r2)), f"npu_rotary_mul takes {DTYPES}")
        a, b, c, dim = input.shape
        _require(dim % 2 == 0 and dim < 896, f"D must be even and below 896, got {dim}")
        # r1/r2 per layout: BSND 1S1D/BS1D/BSND, BNSD 11SD/B1SD/BNSD, SBND S11D/SB1D/SBND (B, N < 1000).
        layouts = {
            "BSND": ({(1, b, 1, dim), (a, b, 1, dim), (a, b, c, dim)}, (a, c)),
            "BNSD": ({(1, 1, c, dim), (a, 1, c, dim), (a, b, c, dim)}, (a, b)),
            "SBND": ({(a, 1, 1, dim), (a, b, 1, dim), (a, b, c, dim)}, (b, c)),
        }
        _require(r1.shape == r2.shape, "r1 and r2 differ in shape")
        matches = [sizes for shapes, sizes in layouts.values() if tuple(r1.shape) in shapes]
        _require(
            bool(matches), f"r1 {tuple(r1.shape)} fits no documented layout of input {tuple(input.shape)}"
        )
        _require(any(max(sizes) < 1000 for sizes in matches), "B and N must be below 1000")
        first, second = input.chunk(2, dim=-1)
        return r1 * input + r2 * torch.cat((-second, first), dim=-1)

    def npu_swiglu(fake, input, dim=-1):
        fake.calls.append(("npu_swiglu", dict(dim=dim)))
        _require(input.dtype in DTYPES, f"npu_swiglu takes {DTYPES}, got {input.dtype}")
        _require(1 <= input.dim() <= 8 and input.numel() > 0, "npu_swiglu takes a non-empty 1-8 D tensor")
        _require(-input.dim() <= dim < input.dim(), f"dim {dim} is out of range for {input.dim()} dimensions")
        _require(input.shape[dim] % 2 == 0, f"dimension {dim} ({input.shape[dim]}) must split in halves")
        _require(input.is_contiguous(), "npu_swiglu takes contiguous tensors only")
        gate, up = input.chunk(2, dim=dim)
        return F.silu(gate) * up


def install(monkeypatch) -> FakeTorchNpu:
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake
