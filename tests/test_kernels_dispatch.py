"""Backend dispatch; the Ascend paths checked through the strict fake torch_npu (arguments, limits, host reads
per step, selective checkpointing); flash-attn's preconditions and `make`'s flash-attn step."""

from __future__ import annotations

import importlib
import logging
import math
import os
import subprocess
import sys
import types
from collections import Counter
from itertools import product
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers.attention import dense_reference
from helpers.fake_torch_npu import install
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.errors import UserError
from mistral_lightning.kernels import (
    BACKEND_ENV,
    attention_dispatch,
    attention_path,
    resolve_backend,
    sliding_window_attention,
)
from mistral_lightning.kernels import backend as kernel_backend
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
    if backend == "flex":  # one block mask carries the window and the documents
        return "flex_sliding_window_attention"
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
    backends, spans = ("npu", "flash", "flex", "portable"), tuple(SPANS)
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
    for backend, span, documents in product(("npu", "flash", "flex", "portable", None), SPANS, (False, True)):
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
    "case",
    [case for case in ATTENTION_PATHS if case.backend != "flex"],
    ids=lambda case: "-".join(map(str, case)),
)
def test_every_path_equals_dense_attention(case, monkeypatch, fake_flash_attn):
    """Each path, reached through sliding_window_attention, against the dense reference with the full
    band mask: on the CPU for the portable paths, through fakes of torch_npu and flash_attn for the others
    (FlexAttention, forward only on the CPU: tests/test_flex_attention.py)."""
    install(monkeypatch)
    monkeypatch.setattr(attention_dispatch, "cpu_has_bf16_matmul", lambda: case.cpu_bf16)
    # Ascend computes fp16, bf16 and fp32 only (the strict fake refuses float64).
    dtype = torch.bfloat16 if case.cpu_bf16 else torch.float32 if case.backend == "npu" else torch.float64
    q, k, v, window, document_ids = inputs(case.span, case.documents, dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert attention_case(q, window, document_ids, case.backend) == case
    out = sliding_window_attention(q, k, v, window, document_ids=document_ids, backend=case.backend)
    expected = dense_reference(*(x.double() for x in (q, k, v)), window, document_ids)
    # torch's own fp32 tolerances for fp32 results against the float64 reference.
    tolerance = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float32: dict(atol=1e-5, rtol=1.3e-6)}
    tolerance = tolerance.get(dtype, {})
    torch.testing.assert_close(out.double(), expected, **tolerance)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    theirs = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), **tolerance)


# ---------------------------------------------------------------- the strict fake torch_npu


def test_fake_npu_takes_only_the_documented_keywords(monkeypatch):
    fake = install(monkeypatch)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="pre_tokens"):  # the documented spelling is pre_tockens
        fake.npu_fusion_attention(q, q, q, 2, "BSND", pre_tokens=3)
    with pytest.raises(TypeError, match="eps"):
        fake.npu_rms_norm(q, torch.ones(16), eps=1e-5)


def test_fake_npu_enforces_the_documented_limits(monkeypatch):
    fake = install(monkeypatch)
    q = torch.randn(1025, 2, 16)
    ends = list(range(1, 1026))
    with pytest.raises(ValueError, match="1 to 1024 sequences"):
        fake.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=ends, actual_seq_kvlen=ends)
    with pytest.raises(ValueError, match="needs actual_seq_kvlen"):
        fake.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=ends[:1023] + [1025])
    with pytest.raises(ValueError, match="sparse_mode 9"):
        fake.npu_fusion_attention(q[None], q[None], q[None], 2, "BSND", sparse_mode=9)
    with pytest.raises(ValueError, match="input_layout 'BTND'"):
        fake.npu_fusion_attention(q[None], q[None], q[None], 2, "BTND")
    with pytest.raises(ValueError, match="one of"):
        fake.npu_fusion_attention(*(x.double() for x in (q[None], q[None], q[None])), 2, "BSND")


def test_fake_npu_reads_both_length_lists(monkeypatch):
    """Two sequences whose queries and keys differ in length: each query sees its own sequence's keys, counted
    from the bottom-right corner (sparse_mode 3), as the documentation draws it."""
    fake = install(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 16, generator=gen)
    kv = torch.randn(9, 2, 16, generator=gen)
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    out = fake.npu_fusion_attention(
        q, kv, kv, 2, "TND", atten_mask=mask, scale=0.25, sparse_mode=3,
        actual_seq_qlen=[2, 5], actual_seq_kvlen=[4, 9],
    )[0]  # fmt: skip
    for (qs, qe), (ks, ke) in (((0, 2), (0, 4)), ((2, 5), (4, 9))):
        rows, keys = qe - qs, ke - ks
        visible = torch.arange(keys)[None, :] <= torch.arange(rows)[:, None] + (keys - rows)
        expected = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), kv[ks:ke].transpose(0, 1), kv[ks:ke].transpose(0, 1),
            attn_mask=visible, scale=0.25,
        ).transpose(0, 1)  # fmt: skip
        torch.testing.assert_close(out[qs:qe], expected)


# ---------------------------------------------------------------- the NPU path, once per batch


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for the device: reading a value (item, int, bool), an output whose shape
    depends on values (nonzero), comparing whole tensors (equal), and copies to the host (.cpu, .tolist,
    .numpy; on CPU tensors these dispatch nothing, so they are counted where they are called)."""

    OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal")
    METHODS = ("cpu", "tolist", "numpy")

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.count = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.name() in self.OPS
        return func(*args, **(kwargs or {}))


def npu_training_step(monkeypatch, num_layers: int) -> tuple[int, list[dict]]:
    """One forward and backward of `Mistral.loss` on packed documents through the npu kernels, with full
    activation checkpointing (every layer's forward runs twice); returns the host reads and the attention calls."""
    from mistral_lightning.training.parallel import apply_activation_checkpointing

    fake = install(monkeypatch)
    monkeypatch.setenv(BACKEND_ENV, "npu")
    config = MistralConfig.from_name("tiny", vocab_size=128, sliding_window=6, num_layers=num_layers)
    torch.manual_seed(0)
    model = Mistral(config)
    model.init_weights()
    apply_activation_checkpointing(model, "full")
    input_ids = torch.randint(0, 128, (2, 24))
    document_ids = torch.tensor([[0] * 9 + [1] * 10 + [2] * 5, [0] * 24])
    with HostReads(monkeypatch) as reads:
        model.loss(input_ids, input_ids, document_ids=document_ids).backward()
    return reads.count, [args for name, args in fake.calls if name == "npu_fusion_attention"]


def test_a_training_step_on_npu_reads_the_host_once_per_batch_not_per_layer(monkeypatch):
    reads = {}
    for layers in (2, 4):
        reads[layers], calls = npu_training_step(monkeypatch, layers)
        assert len(calls) == 2 * layers  # forward, and the recomputation before each layer's backward
        # One compressed mask and one list of lengths for the whole batch, handed to every call.
        assert len({id(args["atten_mask"]) for args in calls}) == 1
        assert len({id(args["actual_seq_qlen"]) for args in calls}) == 1
        assert calls[0]["actual_seq_qlen"] == [9, 19, 24, 48]
    assert reads[2] == reads[4], reads


def test_npu_varlen_splits_calls_over_the_1024_sequence_limit(monkeypatch):
    """1068 documents (one- and two-token documents, then a long one) in two rows: more than one TND call may
    take, split at document boundaries; the result equals the portable path's."""
    fake = install(monkeypatch)
    row = torch.arange(700).repeat_interleave(torch.tensor([1, 2] * 350))[:1000]
    rows = torch.stack((row, torch.cat((torch.arange(400), torch.full((600,), 400)))))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1000, 2, 16, generator=gen)
    kv = torch.randn(2, 1000, 1, 16, generator=gen)
    out = sliding_window_attention(q, kv, kv, 4, document_ids=rows, backend="npu")
    lengths = [len(args["actual_seq_qlen"]) for name, args in fake.calls]
    assert sum(lengths) == 667 + 401 and max(lengths) <= 1024 and len(lengths) == 2
    expected = sliding_window_attention(q, kv, kv, 4, document_ids=rows, backend="portable")
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- flash-attn only where it can run


class CudaTensor(NamedTuple):
    """What the backend choice reads of a tensor, for a CUDA device this machine does not have."""

    device: torch.device
    dtype: torch.dtype


@pytest.fixture
def installed_flash_attn(monkeypatch, tmp_path):
    """Installs a flash_attn package (its body given by the test) on sys.path, on a GPU of the given compute
    capability; returns a function (package body, capability) -> the list of capability queries made."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(kernel_backend, "_FLASH_USABLE", {}, raising=False)  # nothing checked yet
    monkeypatch.syspath_prepend(str(tmp_path))
    queries = []

    def install_package(body: str, capability: tuple[int, int]) -> list:
        (tmp_path / "flash_attn").mkdir()
        (tmp_path / "flash_attn" / "__init__.py").write_text(body)
        importlib.invalidate_caches()
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda device: queries.append(device) or capability
        )
        return queries

    yield install_package
    sys.modules.pop("flash_attn", None)


WORKING_FLASH_ATTN = "def flash_attn_func(*args, **kwargs): ...\n"
H100, V100 = (9, 0), (7, 0)


def test_flash_attn_is_chosen_for_bf16_and_fp16_on_ampere_or_newer(installed_flash_attn, caplog):
    installed_flash_attn(WORKING_FLASH_ATTN, H100)
    for dtype in (torch.bfloat16, torch.float16):
        assert resolve_backend(CudaTensor(torch.device("cuda", 0), dtype)) == "flash"
    assert not caplog.records


@pytest.mark.parametrize(
    "body, capability, dtype, reason",
    [
        (WORKING_FLASH_ATTN, H100, torch.float32, "no torch.float32 kernel"),
        (WORKING_FLASH_ATTN, V100, torch.bfloat16, "compute capability 8.0"),
        (
            "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')\n",
            H100,
            torch.bfloat16,
            "undefined symbol",
        ),
    ],
    ids=["fp32", "pre-ampere", "extension-does-not-load"],
)
def test_flash_attn_falls_back_to_flex_attention_with_one_logged_line(
    installed_flash_attn, caplog, body, capability, dtype, reason
):
    queries = installed_flash_attn(body, capability)
    tensor = CudaTensor(torch.device("cuda", 0), dtype)
    with caplog.at_level(logging.WARNING, logger=kernel_backend.__name__):
        assert [resolve_backend(tensor) for _ in range(3)] == ["flex"] * 3
    (record,) = caplog.records  # once per device and dtype, not per call
    assert reason in record.getMessage() and "FlexAttention" in record.getMessage()
    assert len(queries) == 1  # the preconditions are checked once


# ---------------------------------------------------------------- selective checkpointing per backend


class OpRuns(TorchDispatchMode):
    """How many times each operator runs (by name) while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs[func.name()] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, recomputed", [("selective", 0), ("full", 2)])
def test_selective_checkpointing_keeps_the_npu_attention_output(monkeypatch, mode, recomputed):
    """The backward pass of 2 checkpointed layers reruns npu_fusion_attention once per layer under full
    checkpointing, and never under selective checkpointing, which keeps its output."""
    from mistral_lightning.training.parallel import apply_activation_checkpointing

    install(monkeypatch)
    monkeypatch.setenv(BACKEND_ENV, "npu")
    model = Mistral(MistralConfig.from_name("tiny", vocab_size=128, sliding_window=6))
    model.init_weights()
    apply_activation_checkpointing(model, mode)
    input_ids = torch.randint(0, 128, (2, 16))
    loss = model.loss(input_ids, input_ids, document_ids=torch.tensor([[0] * 7 + [1] * 9, [0] * 16]))
    with OpRuns() as ops:
        loss.backward()
    assert ops.runs["npu::npu_fusion_attention"] == recomputed


@pytest.mark.parametrize(
    "name",
    [
        "flash_attn::_flash_attn_forward",  # flash-attn's custom operators (flash_attn_interface.py)
        "flash_attn::_flash_attn_varlen_forward",
        "npu::npu_fusion_attention",  # torch_npu's operator
        "aten::matmul",  # Ascend linear layers
        "aten::mm",  # CPU and CUDA linear layers
        "aten::_scaled_dot_product_flash_attention",
        "flex_attention",  # FlexAttention's higher-order operator, which selective checkpointing caches
    ],
)
def test_selective_policy_saves_every_backends_matmuls_and_attention(name):
    from mistral_lightning.training.parallel import _selective_policy

    operator = types.SimpleNamespace(name=lambda: name)
    assert _selective_policy(None, operator) == CheckpointPolicy.MUST_SAVE
    assert _selective_policy(None, torch.ops.aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


# ---------------------------------------------------------------- make on a GPU machine

REPO = Path(__file__).resolve().parent.parent


def make(*args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.processes
def test_make_builds_flash_attn_without_isolation_on_gpu_machines_only(tmp_path):
    executable(tmp_path / "nvidia-smi", "exit 0\n")
    build = '--no-build-isolation "flash-attn>=2.6"'
    assert build in make("-n", "-B", "venv", path_prefix=tmp_path).stdout  # nvidia-smi found on PATH
    without_gpu = make("-n", "-B", "venv", "NVIDIA_SMI=").stdout
    assert "flash-attn" not in without_gpu and "torch==2.13.0" in without_gpu


@pytest.mark.processes
@pytest.mark.parametrize("builds", [True, False])
def test_make_flash_attn_says_which_attention_cuda_runs(tmp_path, builds):
    """With a python whose pip build of flash-attn fails (no CUDA toolkit, say), set-up goes on and says that CUDA
    attention runs FlexAttention."""
    failing = 'case "$*" in *no-build-isolation*) echo "CUDA_HOME is not set" >&2; exit 1;; esac\n'
    python = executable(tmp_path / "python", ("" if builds else failing) + "exit 0\n")
    result = make("flash-attn", f"PY={python}")
    assert result.returncode == 0, result.stderr
    expected = "CUDA attention runs its kernels" if builds else "CUDA attention runs FlexAttention"
    assert expected in result.stdout
