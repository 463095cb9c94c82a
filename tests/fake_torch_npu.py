"""A stand-in for torch_npu that records each call and computes what the documented operator computes.

Ascend hardware is out of reach here, so the NPU code paths are checked against this fake: the
arguments they pass (sparse mode, token bands, scale, layout) and the results those arguments mean.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F


class FakeTorchNpu(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.calls: list[tuple[str, dict]] = []

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, **kwargs):
        self.calls.append(
            ("npu_fusion_attention", dict(head_num=head_num, input_layout=input_layout, **kwargs))
        )
        if input_layout == "TND":
            ends = kwargs["actual_seq_qlen"]
            starts = [0, *ends[:-1]]
            pieces = [
                self._band_attention(query[s:e][None], key[s:e][None], value[s:e][None], kwargs)[0]
                for s, e in zip(starts, ends)
            ]
            return (torch.cat(pieces), None, None, None, 0, 0, 0)
        assert input_layout == "BSND", input_layout
        assert query.shape[2] == head_num
        return (self._band_attention(query, key, value, kwargs), None, None, None, 0, 0, 0)

    @staticmethod
    def _band_attention(query, key, value, kwargs):
        """Documented semantics: sparse_mode 4 keeps keys j with i - pre_tockens <= j <= i + next_tockens;
        sparse_mode 3 is bottom-right causal. The compressed mask must be triu(2048x2048, 1)."""
        mask = kwargs["atten_mask"]
        assert mask.dtype == torch.bool and mask.shape == (2048, 2048)
        assert torch.equal(mask, torch.triu(torch.ones_like(mask), 1))
        seq_q, seq_k = query.shape[1], key.shape[1]
        i = torch.arange(seq_q)[:, None] + (seq_k - seq_q)
        j = torch.arange(seq_k)[None, :]
        if kwargs["sparse_mode"] == 4:
            visible = (j >= i - kwargs["pre_tockens"]) & (j <= i + kwargs["next_tockens"])
        else:
            assert kwargs["sparse_mode"] == 3
            visible = j <= i
        groups = query.shape[2] // key.shape[2]
        k = key.repeat_interleave(groups, dim=2).transpose(1, 2)
        v = value.repeat_interleave(groups, dim=2).transpose(1, 2)
        scores = query.transpose(1, 2) @ k.transpose(-1, -2) * kwargs["scale"]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2)

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append(("npu_rms_norm", dict(epsilon=epsilon)))
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return ((x.float() * rstd).to(x.dtype) * gamma, rstd)

    def npu_rotary_mul(self, x, cos, sin):
        self.calls.append(("npu_rotary_mul", {}))
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    def npu_swiglu(self, x, dim=-1):
        self.calls.append(("npu_swiglu", dict(dim=dim)))
        gate, up = x.chunk(2, dim=dim)
        return F.silu(gate) * up


def install(monkeypatch) -> FakeTorchNpu:
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake
