"""A training step's time per device, predicted from the operators of the simulated step.

The memory plan runs the real step on fake tensors (training/memory_plan.py); `OperatorCosts` watches the same
run and adds up what each operator class costs, by size band: matrix-multiply FLOPs (torch's own FLOP formulas,
so attention kernels count only the work they do, inside the window), the bytes every other operator reads and
writes, one dispatch per operator, and each collective's bytes. `DeviceRates`, a row of a calibration table
(`plan calibrate` measures the machine it runs on; training/device_tables/ ships the tables), turns that into
seconds: FLOPs at the matmul rate achieved at their size, bytes at the bandwidth achieved at theirs (small
tensors stay in cache), a fixed cost per operator, and each collective's latency plus its bytes over the link.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import flop_registry

# Size bands: a matrix multiply below SMALL_MATMUL_FLOPS runs at the "small" rate; an operator touching fewer
# than CACHE_BYTES runs at the "cache" bandwidth, fewer than LAST_LEVEL_CACHE_BYTES at the "llc" one, others at
# the "memory" one.
SMALL_MATMUL_FLOPS = 2e8
CACHE_BYTES = 4 * 2**20
LAST_LEVEL_CACHE_BYTES = 64 * 2**20
# Operators that only view, alias or wait: no work of their own.
_FREE = {"view", "_unsafe_view", "alias", "detach", "t", "transpose", "expand", "permute", "slice", "select",
         "as_strided", "unsqueeze", "squeeze", "reshape", "split", "split_with_sizes", "unbind", "wait_tensor",
         "empty", "empty_strided", "lift_fresh"}  # fmt: skip
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


@dataclasses.dataclass
class StepCost:
    """What one optimizer step runs on one device, by size band."""

    small_matmul_flops: float = 0.0
    large_matmul_flops: float = 0.0
    cache_bytes: float = 0.0  # read and written by the operators that are not matrix multiplies
    llc_bytes: float = 0.0
    memory_bytes: float = 0.0
    operators: float = 0.0
    collective_bytes: float = 0.0
    collectives: float = 0.0

    def scaled(self, factor: float) -> StepCost:
        return StepCost(**{field: value * factor for field, value in dataclasses.asdict(self).items()})

    def __add__(self, other: StepCost) -> StepCost:
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return StepCost(**{field: mine[field] + theirs[field] for field in mine})

    @property
    def matmul_flops(self) -> float:
        return self.small_matmul_flops + self.large_matmul_flops


@dataclasses.dataclass(frozen=True)
class DeviceRates:
    """What one process achieves on a device: a row of a calibration table (training/device_tables/*.yaml)."""

    name: str
    small_matmul_tflops: float
    large_matmul_tflops: float
    cache_gbps: float
    llc_gbps: float
    memory_gbps: float
    operator_us: float
    collective_gbps: float
    collective_latency_us: float
    source: str  # how the row was obtained: "measured by plan calibrate on ...", or "published peak ..."

    def seconds(self, cost: StepCost) -> float:
        return (
            cost.small_matmul_flops / (self.small_matmul_tflops * 1e12)
            + cost.large_matmul_flops / (self.large_matmul_tflops * 1e12)
            + cost.cache_bytes / (self.cache_gbps * 1e9)
            + cost.llc_bytes / (self.llc_gbps * 1e9)
            + cost.memory_bytes / (self.memory_gbps * 1e9)
            + cost.operators * self.operator_us * 1e-6
            + cost.collectives * self.collective_latency_us * 1e-6
            + cost.collective_bytes / (self.collective_gbps * 1e9)
        )


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _local(tree):
    """A DTensor's shard where the tree has a DTensor: what its device computes on."""
    return tree_map_only(DTensor, lambda tensor: tensor._local_tensor, tree)


# The CPU's fused attention kernels compute what the flash ones do; torch's FLOP table names only the latter.
_FLOP_COUNTERS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[
        torch.ops.aten._scaled_dot_product_flash_attention
    ],
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_registry[
        torch.ops.aten._scaled_dot_product_flash_attention_backward
    ],
}
# DTensor's redistributions call these inside its own dispatch, where no mode sees them: they are counted by
# wrapping them while the simulation runs.
_FUNCTIONAL_COLLECTIVES = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_tensor",
                           "reduce_scatter_tensor", "all_to_all_single")  # fmt: skip


class OperatorCosts(TorchDispatchMode):
    """Adds each operator's cost to `cost` while active; `skip()` says when not to count (DTensor working out
    an operator's layout on global shapes)."""

    def __init__(self, skip=lambda: False) -> None:
        super().__init__()
        self.cost = StepCost()
        self.skip = skip

    @contextlib.contextmanager
    def functional_collectives(self) -> Iterator[None]:
        """Count the collectives DTensor runs (tensor and sequence parallelism) while active."""
        originals = {name: getattr(funcol, name) for name in _FUNCTIONAL_COLLECTIVES if hasattr(funcol, name)}

        def counted(collective):
            def run(*args, **kwargs):
                out = collective(*args, **kwargs)
                if not self.skip():
                    self.cost.collectives += 1
                    self.cost.collective_bytes += _bytes(tree_leaves(out))
                return out

            return run

        for name, collective in originals.items():
            setattr(funcol, name, counted(collective))
        try:
            yield
        finally:
            for name, collective in originals.items():
                setattr(funcol, name, collective)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.skip():
            return out
        # A DTensor operator runs its local shards' operator inside DTensor's dispatch, which no mode sees: it is
        # counted here, on the shards.
        args, kwargs, out_local = _local(args), _local(kwargs), _local(out)
        name = func._overloadpacket.__name__
        cost = self.cost
        if func.namespace in _COLLECTIVE_NAMESPACES:
            if name != "wait_tensor":
                cost.collectives += 1
                cost.collective_bytes += _bytes(tree_leaves(out_local))
            return out
        if name in _FREE:
            return out
        cost.operators += 1
        counter: Any = _FLOP_COUNTERS.get(func._overloadpacket)
        if counter is not None:
            flops = counter(*args, **kwargs, out_val=out_local)
            if flops < SMALL_MATMUL_FLOPS:
                cost.small_matmul_flops += flops
            else:
                cost.large_matmul_flops += flops
        else:
            moved = _bytes(tree_leaves((args, kwargs))) + _bytes(tree_leaves(out_local))
            if moved < CACHE_BYTES:
                cost.cache_bytes += moved
            elif moved < LAST_LEVEL_CACHE_BYTES:
                cost.llc_bytes += moved
            else:
                cost.memory_bytes += moved
        return out
