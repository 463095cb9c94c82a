"""The NPU accelerator and strategy, through a fake torch_npu runtime that records calls.

Ascend hardware is out of reach here: these tests check what our code asks of torch_npu and of
Lightning (device parsing, set_device, hccl, a device mesh on "npu", autocast on "npu"), not that
an NPU runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import model_parallel

from mistral_lightning.callbacks import lookup_peak_tflops, peak_memory
from mistral_lightning.callbacks.throughput import device_name
from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.ranks import init_distributed
from mistral_lightning.training.npu import NPUAccelerator
from mistral_lightning.training.strategy import DeviceModelParallelStrategy


class FakeNpuRuntime(types.SimpleNamespace):
    """`torch.npu` as torch_npu installs it, on a machine with 8 Ascend 910B3."""

    def __init__(self) -> None:
        super().__init__(calls=[])

    def _record(self, name, *args):
        self.calls.append((name, *args))

    def device_count(self):
        return 8

    def is_available(self):
        return True

    def set_device(self, device):
        self._record("set_device", device)

    def empty_cache(self):
        self._record("empty_cache")

    def memory_stats(self, device):
        return {"allocated_bytes.all.peak": 123}

    def get_device_name(self, device):
        return "Ascend910B3"

    def synchronize(self, device=None):
        self._record("synchronize", device)

    def max_memory_allocated(self, device):
        return 40 * 2**30

    def max_memory_reserved(self, device):
        return 44 * 2**30


# Naming PrivateUse1 "npu" cannot be undone and breaks later gloo collectives in the same process, so the
# tests that need npu devices run in a fresh interpreter (this file again, with FRESH_PROCESS set).
FRESH_PROCESS = "MISTRAL_LIGHTNING_NPU_TESTS"


@pytest.mark.processes
def test_npu_device_paths_in_a_fresh_process():
    if os.environ.get(FRESH_PROCESS):
        return
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, FRESH_PROCESS: "1"},
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "16 passed" in result.stdout  # the five device tests ran there


@pytest.fixture
def npu(monkeypatch) -> FakeNpuRuntime:
    runtime = FakeNpuRuntime()
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", runtime, raising=False)
    # torch_npu names PrivateUse1 "npu", which makes torch.device("npu", i) valid, and registers hccl as the
    # collective backend of npu devices (once per process).
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")
        torch.distributed.Backend.register_backend("hccl", lambda *args: None, devices=["npu"])
    return runtime


def test_one_strategy_serves_cuda_with_nccl_and_cuda_autocast():
    """The strategy of the Ascend configs, given `trainer.accelerator cuda`: nccl and autocast on cuda."""
    strategy = DeviceModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    strategy.accelerator = CUDAAccelerator()
    strategy.precision_plugin = MixedPrecision("bf16-mixed", device="cuda")
    strategy.parallel_devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert strategy._get_process_group_backend() == "nccl"
    assert strategy.precision_plugin.device == "cuda"


@pytest.mark.parametrize("device, expected", [("cuda", ("cuda:1", "nccl")), ("cpu", ("cpu", "gloo"))])
def test_evaluate_under_torchrun_takes_the_local_device_and_its_backend(monkeypatch, device, expected):
    groups, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", groups.append)
    # An earlier in-process run of the same pytest session may have left its process group up.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    assert (init_distributed(device), *groups) == expected
    assert devices == ([expected[0]] if device == "cuda" else [])


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H200 NVL", 835.0), ("NVIDIA H200", 989.5), ("NVIDIA H100 PCIe", 756.0), ("Ascend910B2", 354.0)],
)
def test_peak_tflops_by_device_name(name, peak):
    """NVIDIA's and Huawei's dense bf16 figures; the NVL H200 runs at a lower clock than the SXM one."""
    assert lookup_peak_tflops(name) == peak


def test_batches_are_pinned_for_any_accelerator(monkeypatch, toy_data):
    """On Ascend torch.cuda reports no GPU; torch.accelerator reports the NPU."""
    from helpers.training import datamodule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    data = datamodule(toy_data)
    data.setup()
    assert data.train_dataloader().pin_memory


def test_registered_as_npu():
    assert "npu" in AcceleratorRegistry
    assert isinstance(AcceleratorRegistry.get("npu"), NPUAccelerator)


def test_unavailable_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert NPUAccelerator.is_available() is False
    with pytest.raises(UserError, match=r"mistral-lightning\[npu\]"):
        NPUAccelerator.auto_device_count()


if os.environ.get(FRESH_PROCESS):

    def test_device_parsing(npu):
        assert NPUAccelerator.is_available() and NPUAccelerator.auto_device_count() == 8
        assert NPUAccelerator.parse_devices(2) == [0, 1]
        assert NPUAccelerator.parse_devices("0,3") == [0, 3]
        assert NPUAccelerator.parse_devices("auto") == list(range(8)) == NPUAccelerator.parse_devices(-1)
        assert NPUAccelerator.get_parallel_devices([0, 3]) == [torch.device("npu", 0), torch.device("npu", 3)]
        with pytest.raises(UserError, match="trainer.devices"):
            NPUAccelerator.parse_devices([9])

    def test_set_device_and_stats(npu):
        accelerator = NPUAccelerator()
        accelerator.setup_device(torch.device("npu", 1))
        assert npu.calls == [("set_device", torch.device("npu", 1))]
        assert accelerator.get_device_stats(torch.device("npu", 1)) == {"allocated_bytes.all.peak": 123}
        with pytest.raises(UserError, match="expected an npu device"):
            accelerator.setup_device(torch.device("cpu"))

    def test_strategy_uses_hccl_a_mesh_on_npu_and_autocast_on_npu(npu, monkeypatch):
        connections, meshes = [], []
        monkeypatch.setattr(
            model_parallel,
            "_init_dist_connection",
            lambda env, backend, **kw: connections.append((backend, kw)),
        )
        monkeypatch.setattr(model_parallel, "_setup_device_mesh", lambda *args: meshes.append(args) or "mesh")
        trainer = L.Trainer(
            accelerator="npu",
            devices=2,
            strategy=DeviceModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
            precision="bf16-mixed",
            logger=False,
        )
        strategy = trainer.strategy
        assert (
            isinstance(strategy.precision_plugin, MixedPrecision)
            and strategy.precision_plugin.device == "npu"
        )
        assert strategy.root_device == torch.device("npu", 0)
        strategy._lightning_module = L.LightningModule()
        strategy.setup_environment()
        assert ("set_device", torch.device("npu", 0)) in npu.calls
        assert connections == [("hccl", {"timeout": strategy._timeout, "device_id": torch.device("npu", 0)})]
        assert meshes == [(1, 2, 2, torch.device("npu", 0))]

    def test_evaluate_under_torchrun_on_npus_takes_the_local_npu_and_hccl(npu, monkeypatch):
        groups = []
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("LOCAL_RANK", "3")
        monkeypatch.setattr(torch.distributed, "init_process_group", groups.append)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
        assert init_distributed("npu") == "npu:3"
        assert npu.calls == [("set_device", "npu:3")] and groups == ["hccl"]

    def test_callbacks_read_the_npu(npu):
        device = torch.device("npu", 0)
        assert device_name(device) == "Ascend910B3" and lookup_peak_tflops(device_name(device)) == 295.0
        assert peak_memory(device) == {"peak_allocated": 40 * 2**30, "peak_reserved": 44 * 2**30}
