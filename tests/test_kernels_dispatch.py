"""Backend dispatch, and the Ascend paths checked through a recording fake torch_npu."""

from __future__ import annotations

import math

import pytest
import torch
from fake_torch_npu import install

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.kernels import BACKEND_ENV, resolve_backend, sliding_window_attention


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
    import sys

    monkeypatch.setitem(sys.modules, "torch_npu", None)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match=r"mistral-lightning\[npu\]"):
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
