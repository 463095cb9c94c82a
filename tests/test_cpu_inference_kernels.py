"""The CPU decoding fast paths against independent references: float64 products, transformers' greedy
generate, and the autograd versions of the same kernels."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers.models import random_model

from mistral_lightning import generate
from mistral_lightning.kernels import apply_rotary, masked_attention, pack_linear_weights, rms_norm, swiglu
from mistral_lightning.kernels.packed_linear import PackedLinear, can_pack

DTYPES = [torch.float32] + ([torch.bfloat16] if can_pack(torch.zeros(1, dtype=torch.bfloat16)) else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [(1,), (3, 5)], ids=["one-row", "batch"])
def test_packed_linear_equals_the_product(dtype, rows):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=False).to(dtype)
    torch.nn.init.normal_(linear.weight, generator=gen)
    x = torch.randn(*rows, 48, generator=gen).to(dtype)
    expected = (x.double() @ linear.weight.double().T).to(dtype)
    torch.testing.assert_close(PackedLinear(linear)(x), expected)


def test_packing_swaps_every_linear_and_greedy_decoding_still_equals_transformers(tmp_path):
    model = random_model(window=6)
    folder = model.save_pretrained(tmp_path / "hf")
    theirs = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert pack_linear_weights(model) == 2 * 7 + 1
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    prompt = [1, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    reference = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert generate(model, [prompt], 20, eos_id=None)[0] == reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_attention_in_half_precision_is_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    # One decoded query (4 heads) over 9 cached keys (2 KV heads).
    q = torch.randn(2, 1, 4, 16, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, 2, 9, 2, 16, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 1, 1, 9, generator=gen) > 0.3
    mask[..., -1] = True
    out = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert out.dtype == dtype
    # Reference: the float64 softmax over the same (half-rounded) inputs and mask.
    qh, kh, vh = (t.to(dtype).double() for t in (q, k, v))
    kh, vh = kh.repeat_interleave(2, dim=2), vh.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / 4.0
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vh)
    torch.testing.assert_close(out, expected.to(dtype))


def test_no_grad_kernels_equal_their_autograd_versions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 16, generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(16, generator=gen, dtype=torch.bfloat16)
    angles = torch.randn(2, 5, 1, 16, generator=gen)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    gate, up = torch.randn(2, 2, 5, 24, generator=gen, dtype=torch.bfloat16)
    gate = gate.clone()
    leaf = x.clone().requires_grad_()
    with_grad = [
        rms_norm(leaf, weight, 1e-5),
        apply_rotary(leaf, cos, sin),
        swiglu(gate.requires_grad_(), up),
    ]
    assert all(t.grad_fn is not None for t in with_grad)
    with torch.no_grad():
        without = [rms_norm(x, weight, 1e-5), apply_rotary(x, cos, sin), swiglu(gate, up)]
    for a, b in zip(with_grad, without):
        assert b.grad_fn is None and torch.equal(a.detach(), b)
