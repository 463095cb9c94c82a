"""Calibration tables of what a device achieves, per process, with N processes on it at once.

A table is a YAML file: `name`, `source`, and `processes: {N: {rates}}` (rates as `step_time.DeviceRates`
names them). `plan calibrate` measures one on the machine it runs on: for each N it starts N processes at
once (each with the machine's cores / N threads, as fit's launcher gives them), each timing matrix multiplies
of a small and a large size, elementwise adds in cache, in the last-level cache and in memory, a one-element
operator under autograd (the fixed cost of an operator), and with N > 1 all-reduces of 4 KB and 16 MB among
them; the table keeps the mean over the processes. device_tables/ ships the tables of known devices.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from mistral_lightning.devices import device_name, synchronize
from mistral_lightning.errors import UserError
from mistral_lightning.generation.loading import resolve_device
from mistral_lightning.option_values import AUTO_DEVICE
from mistral_lightning.training.step_time import DeviceRates

TABLES = Path(__file__).resolve().parent / "device_tables"
# The table each accelerator usually means when none is named: this repository's CPU machine, the H100.
DEFAULT_TABLES = {"cpu": "cpu-2core", "cuda": "h100", "gpu": "h100"}
RATE_FIELDS = tuple(
    field.name for field in dataclasses.fields(DeviceRates) if field.name not in ("name", "source")
)


def load_table(path: str | Path) -> dict[int, DeviceRates]:
    """The rows of a calibration table, by process count; a name without a folder is a shipped table."""
    path = Path(path)
    if not path.suffix and path.parent == Path("."):
        path = TABLES / f"{path}.yaml"
    try:
        table = yaml.safe_load(path.read_text())
        return {
            int(count): DeviceRates(
                name=table["name"], source=table["source"], **{k: float(row[k]) for k in RATE_FIELDS}
            )
            for count, row in table["processes"].items()
        }
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as error:
        shipped = ", ".join(sorted(p.stem for p in TABLES.glob("*.yaml")))
        raise UserError(
            f"--device_rates {path}: not a calibration table ({error}); give one `plan calibrate` wrote, or a shipped "
            f"one: {shipped}"
        ) from error


# Without a table for the device (an NPU): only the matmul FLOPs, i.e. the recomputation, decide.
FLOPS_ONLY = DeviceRates("flops only", 1.0, 1.0, 1e12, 1e12, 1e12, 0.0, 1e12, 0.0, "recomputed FLOPs only")


def shipped_table(accelerator: str, card: str = "") -> dict[int, DeviceRates] | None:
    """The shipped table of the device a run is on: the one its card name names (an H200 is not an H100), else
    the accelerator's usual one; None where none is shipped (an NPU)."""
    for path in sorted(TABLES.glob("*.yaml")):
        if path.stem in card.lower():
            return load_table(path)
    name = DEFAULT_TABLES.get(accelerator)
    return load_table(name) if name else None


def device_table(accelerator: str, card: str = "") -> dict[int, DeviceRates]:
    """`shipped_table`, else FLOPS_ONLY: what `auto` ranks checkpointing mixes by."""
    return shipped_table(accelerator, card) or {1: FLOPS_ONLY}


def rates_for(table: dict[int, DeviceRates], processes: int) -> DeviceRates:
    """The row for `processes` processes per device group, or the nearest measured count above (below) it."""
    counts = sorted(table)
    above = [count for count in counts if count >= processes]
    return table[above[0] if above else counts[-1]]


def _seconds(fn, repeat: int, device: torch.device) -> float:
    """Seconds per call of `fn`, after one warm-up; an accelerator runs its kernels queued, so the clock starts
    and stops with its queue empty."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def _matmul_tflops(size: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> float:
    m, k, n = size
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / _seconds(lambda: a @ b, 20, device) / 1e12


def _add_gbps(elements: int, device: torch.device) -> float:
    x, y = torch.randn(elements, device=device), torch.randn(elements, device=device)
    return 3 * elements * 4 / _seconds(lambda: x + y, 20, device) / 1e9


def _operator_us(device: torch.device) -> float:
    x = torch.randn(8, device=device, requires_grad=True)
    return _seconds(lambda: x * 2, 2000, device) * 1e6


def _collective(elements: int, repeat: int) -> float:
    tensor = torch.zeros(elements)
    dist.barrier()
    return _seconds(lambda: dist.all_reduce(tensor), repeat, torch.device("cpu"))


def measure(dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> dict[str, float]:
    """This process's rates (with its process group, if one is up, for the collectives)."""
    device = device or torch.device("cpu")
    rates = {
        "small_matmul_tflops": _matmul_tflops((2048, 128, 256), device, dtype),
        "large_matmul_tflops": _matmul_tflops((2048, 1024, 2048), device, dtype),
        # An add of n floats moves 12n bytes: 1.5 MB, 24 MB and 192 MB, one in each band of step_time.py.
        "cache_gbps": _add_gbps(2**17, device),
        "llc_gbps": _add_gbps(2**21, device),
        "memory_gbps": _add_gbps(2**24, device),
        "operator_us": _operator_us(device),
        "collective_latency_us": 0.0,
        "collective_gbps": 1e3,  # one process: nothing crosses a link
    }
    if dist.is_initialized() and dist.get_world_size() > 1:
        latency = _collective(1024, 50)
        rates["collective_latency_us"] = latency * 1e6
        # An all-reduce moves about twice its bytes per rank (reduce-scatter, then all-gather).
        rates["collective_gbps"] = 4 * 2**22 / max(_collective(2**22, 5) - latency, 1e-9) / 1e9
    return rates


def _worker(rank: int, processes: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    if processes > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=processes)
    rates = measure()
    if processes > 1:
        dist.destroy_process_group()
    Path(out_dir, f"{rank}.yaml").write_text(yaml.safe_dump(rates))


def calibrate_table(process_counts: tuple[int, ...] = (1, 2, 4)) -> dict:
    """A calibration table of this machine: its GPU or NPU (bf16, one process) if it has one, else its CPU
    (fp32) measured with each number of processes at once."""
    device = torch.device(resolve_device(AUTO_DEVICE))
    if device.type != "cpu":
        rows = {1: measure(torch.bfloat16, device)}
        where = device_name(device)
        name = where.lower().replace(" ", "-")
    else:
        rows = {}
        for processes in process_counts:
            with tempfile.TemporaryDirectory() as folder:
                mp.start_processes(
                    _worker,
                    args=(processes, f"{folder}/store", folder),
                    nprocs=processes,
                    start_method="spawn",
                )
                measured = [
                    yaml.safe_load(Path(folder, f"{rank}.yaml").read_text()) for rank in range(processes)
                ]
            rows[processes] = {
                key: round(statistics.mean(m[key] for m in measured), 6) for key in measured[0]
            }
        cores = os.cpu_count()
        name, where = f"cpu-{cores}core", f"{platform.processor() or platform.machine()}, {cores} cores"
    return {
        "name": name,
        "source": f"measured by plan calibrate on {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "processes": rows,
    }
