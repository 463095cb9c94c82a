"""Backend dispatch, and the Ascend paths checked through a recording fake torch_npu."""

from __future__ import annotations

import math
import sys
import types
from itertools import product

import pytest
import torch
import torch.nn.functional as F
from fake_torch_npu import install
from test_attention_kernel import dense_reference

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.errors import UserError
from mistral_lightning.kernels import (
    BACKEND_ENV,
    attention_dispatch,
    attention_path,
    resolve_backend,
    sliding_window_attention,
)
from mistral_lightning.kernels.attention_dispatch import ATTENTION_PATHS, AttentionCase, attention_case


def test_auto_backend_on_cpu_is_portable(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.zeros(1)) == "portable"


def test_environment_variable_overrides_and_bad_value_is_named(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "npu")
    assert resolve_backend(torch.zeros(1)) == "npu"
    monkeypatch.setenv(BACKEND_ENV, "tpu")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend(torch.zeros(1))


def test_npu_backend_without_torch_npu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(UserError, match=rf"{BACKEND_ENV}=portable.*mistral-lightning\[npu\]"):
        sliding_window_attention(q, q, q, 2, backend="npu")


@pytest.mark.parametrize("window", [5, None])
def test_npu_attention_arguments(monkeypatch, window):
    fake = install(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 13, 4, 16, generator=gen)
    k = torch.randn(2, 13, 2, 16, generator=gen)
    v = torch.randn(2, 13, 2, 16, generator=gen)
    out = sliding_window_attention(q, k, v, window, backend="npu")
    ((name, args),) = fake.calls
    assert name == "npu_fusion_attention"
    assert args["input_layout"] == "BSND" and args["head_num"] == 4
    assert args["scale"] == pytest.approx(1 / math.sqrt(16))  # the operator's default scale is 1.0
    if window:
        # W - 1 earlier keys plus the query itself: exactly W keys, as HF (ModelLink's W would give W + 1).
        assert (args["sparse_mode"], args["pre_tockens"], args["next_tockens"]) == (4, window - 1, 0)
    else:
        assert args["sparse_mode"] == 3
    torch.testing.assert_close(out, sliding_window_attention(q, k, v, window, backend="portable"))


def test_npu_attention_with_documents_uses_varlen_layout(monkeypatch):
    fake = install(monkeypatch)
    q = torch.randn(2, 10, 4, 16)
    kv = torch.randn(2, 10, 2, 16)
    document_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    out = sliding_window_attention(q, kv, kv, 3, document_ids=document_ids, backend="npu")
    args = fake.calls[0][1]
    assert args["input_layout"] == "TND"
    assert args["actual_seq_qlen"] == [4, 10, 20] == args["actual_seq_kvlen"]
    expected = sliding_window_attention(q, kv, kv, 3, document_ids=document_ids, backend="portable")
    torch.testing.assert_close(out, expected)


def test_whole_model_on_npu_kernels_equals_portable(monkeypatch):
    fake = install(monkeypatch)
    config = MistralConfig.from_name("tiny", vocab_size=128, sliding_window=6)
    torch.manual_seed(0)
    model = Mistral(config)
    model.init_weights()
    input_ids = torch.randint(0, 128, (2, 20))
    monkeypatch.setenv(BACKEND_ENV, "portable")
    expected = model(input_ids)
    monkeypatch.setenv(BACKEND_ENV, "npu")
    torch.testing.assert_close(model(input_ids), expected, rtol=1e-5, atol=1e-5)
    used = {name for name, _ in fake.calls}
    assert used == {"npu_fusion_attention", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu"}
    eps = {args["epsilon"] for name, args in fake.calls if name == "npu_rms_norm"}
    assert eps == {config.rms_norm_eps}


# ---------------------------------------------------------------- the attention dispatch table

SPANS = {"causal": (21, None), "within_window": (13, 16), "beyond_window": (40, 8)}  # span: (T, window)


def expected_path(backend, cpu_bf16, span, documents):
    """The dispatch rules in words: device kernels take everything (documents in their varlen layout); the
    portable backend runs causal SDPA while no key leaves the window, the banded kernel past it in bf16 on
    CPUs with native bf16 matmuls, blocked SDPA otherwise."""
    if backend != "portable":
        return {"npu": "npu_fusion_attention", "flash": "flash_attention"}[backend] + (
            "_varlen" if documents else ""
        )
    if span == "beyond_window" and cpu_bf16:
        return "banded_cpu_attention"
    if documents:
        return "blocked_sdpa_causal_documents" if span == "causal" else "blocked_sdpa_band"
    return "blocked_sdpa_band" if span == "beyond_window" else "sdpa_causal"


def inputs(span, documents, dtype=torch.float64, device="cpu", seed=0):
    seq_len, window = SPANS[span]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, seq_len, h, 16, generator=gen, dtype=dtype).to(device) for h in (4, 2, 2))
    document_ids = None
    if documents:  # three documents and -1 padding in row 0, one document in row 1
        third = seq_len // 3
        row = [0] * third + [1] * third + [2] * (seq_len - 2 * third - 2) + [-1] * 2
        document_ids = torch.tensor([row, [0] * seq_len], device=device)
    return q, k, v, window, document_ids


def test_the_table_has_one_path_per_case():
    backends, spans = ("npu", "flash", "portable"), tuple(SPANS)
    assert set(ATTENTION_PATHS) == {
        AttentionCase(*key) for key in product(backends, (False, True), spans, (False, True))
    }
    for case, path in ATTENTION_PATHS.items():
        assert path.__name__ == expected_path(*case), case


@pytest.mark.parametrize("native_bf16", [False, True], ids=["emulated-bf16", "native-bf16"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_device_dtype_span_and_documents_maps_to_its_named_path(
    monkeypatch, native_bf16, device, dtype
):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(attention_dispatch, "cpu_has_bf16_matmul", lambda: native_bf16)
    cpu_bf16 = device == "cpu" and dtype == torch.bfloat16 and native_bf16
    for backend, span, documents in product(("npu", "flash", "portable", None), SPANS, (False, True)):
        q, _, _, window, document_ids = inputs(span, documents, dtype, device)
        case = attention_case(q, window, document_ids, backend)
        assert case == AttentionCase(backend or "portable", cpu_bf16, span, documents)
        assert attention_path(q, window, document_ids, backend) == expected_path(*case)


def flash_attn_reference(q, k, v, causal, window_size):
    """flash-attn's documented semantics for one [B, T, H, D] batch: key j is visible to query i iff
    i - left <= j <= i + right (-1: unbounded), and j <= i when causal; GQA by head groups."""
    left, right = window_size
    i, j = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
    visible = (j <= i) if causal else torch.ones_like(i == j)
    if left >= 0:
        visible = visible & (j >= i - left)
    if right >= 0:
        visible = visible & (j <= i + right)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible, enable_gqa=True
    )
    return out.transpose(1, 2)


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """flash_attn as a module computing what its two functions document, recording each call."""
    module = types.ModuleType("flash_attn")
    module.calls = []

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        module.calls.append("flash_attn_func")
        return flash_attn_reference(q, k, v, causal, window_size)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window_size=(-1, -1)):
        module.calls.append("flash_attn_varlen_func")
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        pieces = zip(cu_q[:-1].tolist(), cu_q[1:].tolist())
        return torch.cat(
            [
                flash_attn_reference(*(x[None, s:e] for x in (q, k, v)), causal, window_size)[0]
                for s, e in pieces
            ]
        )

    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


@pytest.mark.parametrize(
    "case", [case for case in ATTENTION_PATHS], ids=lambda case: "-".join(map(str, case))
)
def test_every_path_equals_dense_attention(case, monkeypatch, fake_flash_attn):
    """Each path, reached through sliding_window_attention, against the dense reference with the full
    band mask: on the CPU for the portable paths, through fakes of torch_npu and flash_attn for the others."""
    install(monkeypatch)
    monkeypatch.setattr(attention_dispatch, "cpu_has_bf16_matmul", lambda: case.cpu_bf16)
    dtype = torch.bfloat16 if case.cpu_bf16 else torch.float64
    q, k, v, window, document_ids = inputs(case.span, case.documents, dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert attention_case(q, window, document_ids, case.backend) == case
    out = sliding_window_attention(q, k, v, window, document_ids=document_ids, backend=case.backend)
    expected = dense_reference(*(x.double() for x in (q, k, v)), window, document_ids)
    tolerance = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.double(), expected, **tolerance)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    theirs = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), **tolerance)
