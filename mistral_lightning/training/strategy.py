"""DeviceModelParallelStrategy: Lightning's ModelParallelStrategy (FSDP2 + DTensor TP) on any accelerator,
whose checkpoints are good or absent, and are read without running pickled code.

Devices: two choices follow the device instead of being fixed: the collective backend, the one PyTorch
registers for the device type (nccl for cuda, hccl for npu once torch_npu is imported, gloo for cpu), and
the autocast device of the mixed-precision plugin, which Lightning's accelerator connector sets to "cuda"
for every accelerator other than cpu/mps. The device mesh takes its type from the root device already.

Saving: weights or optimizer state holding NaN/Inf are never written (checked once per save, one
all-reduce); a checkpoint is written under a temporary name, marked complete (checkpoint/integrity.py)
and renamed into place (outputs.publish), so an interrupted save leaves the previous one untouched;
a failed write (a full disk) removes the temporary and stops with one line naming the folder and its
free space. Loading: the checkpoint is checked first (no pickled code unless `trust_checkpoint`, complete);
an incomplete `last.ckpt` gives way to the newest complete checkpoint, with a note; then every rank checks
it and reads it through the same checks (Lightning's own DCP load would unpickle it again unchecked).
Frozen parameters (a LoRA run's base) are neither saved nor loaded: they come from `model.pretrained` again, so an adapter
checkpoint holds the adapters and their optimizer state only. `mistral-lightning fit|validate|test|predict` use it in place of Lightning's class
(cli/fit.py).
"""

from __future__ import annotations

import math
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from mistral_lightning.checkpoint.base import CheckpointError, UnsafeCheckpointError
from mistral_lightning.checkpoint.integrity import (
    SAVE_ID,
    checkpoint_to_load,
    inspect_checkpoint,
    last_good_checkpoint,
    new_save_id,
    read_saved_state,
    resolve_last,
    write_completion_marker,
)
from mistral_lightning.checkpoint.safe_pickle import WeightsOnlyLoadPlanner, checkpoint_failure, dcp_reader
from mistral_lightning.errors import UserError
from mistral_lightning.outputs import (
    OutputError,
    OutputTarget,
    describe_write_error,
    publish,
    remove_all_leftovers,
    remove_leftovers,
    temporary_sibling,
)
from mistral_lightning.training.divergence import TrainingDivergedError
from mistral_lightning.training.parallel import build_device_mesh


def _first_failure(err: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException, which gathers one per failing rank."""
    if isinstance(err, CheckpointException) and err.failures:
        return checkpoint_failure(err)
    return err


def _gigabytes_free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free there"
    except OSError:
        return "its free space unknown"


class DeviceModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (FSDP2 + DTensor TP) on the run's device, with checked checkpoints; see the
    module doc.

    context_parallel_size: ranks that each hold a contiguous shard of every sequence
    (training/context_parallel.py). With more than one, the mesh is (data_parallel, context_parallel,
    tensor_parallel), tensor parallelism innermost (inside a node), and FSDP2 shards over data × context
    (the flattened `data_context_parallel` dimension), as torchtitan does.
    """

    # Load checkpoints with full unpickling (`--trust-checkpoint`): only for checkpoints one trusts.
    trust_checkpoint: bool = False

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int | Literal["auto"] = "auto",
        context_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size,
            tensor_parallel_size,
            save_distributed_checkpoint,
            process_group_backend,
            timeout,
        )
        if context_parallel_size < 1:
            raise UserError(
                f"trainer.strategy.init_args.context_parallel_size={context_parallel_size} must be >= 1"
            )
        self._context_parallel_size = context_parallel_size

    @property
    def context_parallel_layout(self) -> tuple[int, int]:
        """(size, this rank's index) of context parallelism (distributed.context_parallel_layout)."""
        if self._context_parallel_size == 1:
            return 1, 0
        return self._context_parallel_size, self.device_mesh["context_parallel"].get_local_rank()

    def setup_environment(self) -> None:
        if self._context_parallel_size == 1:
            super().setup_environment()
            return
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        context = self._context_parallel_size
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = self.num_processes // context
        sizes = (self._data_parallel_size, context, self._tensor_parallel_size)
        if math.prod(sizes) != self.world_size:
            raise UserError(
                f"data_parallel_size × context_parallel_size × tensor_parallel_size = {' × '.join(map(str, sizes))}"
                f" must equal the {self.world_size} processes (trainer.devices × trainer.num_nodes)"
            )
        mesh = build_device_mesh(self.root_device.type, *sizes)
        self._device_mesh = mesh
        self.lightning_module._device_mesh = mesh

    # ------------------------------------------------------------------ the device
    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or torch.distributed.get_default_backend_for_device(
            self.root_device
        )

    @property
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # The connector sets the accelerator before the precision plugin; its registered name is the device type.
        name = getattr(self.accelerator, "name", None)
        device_type = name() if callable(name) else None
        if isinstance(plugin, MixedPrecision) and device_type not in (None, plugin.device):
            plugin = MixedPrecision(plugin.precision, device=device_type)
        self._precision_plugin = plugin

    def _has_frozen_parameters(self) -> bool:
        return any(not param.requires_grad for param in self.model.parameters())

    # ------------------------------------------------------------------ saving
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Lightning's state dict, less the frozen parameters (skipped before any copy to the CPU).
        options = StateDictOptions(
            full_state_dict=not self._save_distributed_checkpoint,  # Lightning's save_distributed_checkpoint
            cpu_offload=True,
            ignore_frozen_params=True,
        )
        return get_model_state_dict(self.model, options=options)

    def _agree(self, ok: bool) -> bool:
        """True on every rank only if it is true on every rank."""
        flag = torch.tensor(1.0 if ok else 0.0, device=self.root_device)
        return bool(self.reduce(flag, reduce_op="min").item())

    def _state_is_finite(self) -> bool:
        # What a checkpoint holds: frozen weights (a LoRA base, QLoRA's NF4 copies) are neither trained nor saved.
        tensors = [param for param in self.lightning_module.parameters() if param.requires_grad]
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        finite = torch.ones((), dtype=torch.bool, device=self.root_device)
        for tensor in tensors:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.is_floating_point():
                finite &= torch.isfinite(local).all().to(finite.device)
        return self._agree(bool(finite.item()))

    def _refuse_non_finite(self, checkpoint: dict[str, Any], path: Path) -> None:
        if self._state_is_finite():
            return
        lr = (
            f" (the learning rate is now {self.optimizers[0].param_groups[0]['lr']:g})"
            if self.optimizers
            else ""
        )
        raise TrainingDivergedError(
            f"step {checkpoint.get('global_step')}: the weights or optimizer state hold NaN or Inf, so {path} "
            f"is not written; {last_good_checkpoint(path.parent)}; resume from it with a lower "
            f"model.optimizer.lr{lr} or with gradient clipping (trainer.gradient_clip_val)"
        )

    def _write_failure(self, err: BaseException | None, path: Path, tmp: Path) -> UserError:
        if err is None:
            return OutputError(
                f"{path}: another rank failed to write its part of the checkpoint; see its error"
            )
        cause = _first_failure(err)
        target = OutputTarget(path.parent, option="ModelCheckpoint dirpath")
        described = describe_write_error(cause, tmp, target)
        if described is None:
            raise err
        return OutputError(
            f"{described}; {_gigabytes_free(path.parent)}; {last_good_checkpoint(path.parent)}"
        )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        path = Path(self.broadcast(str(filepath)))
        self._refuse_non_finite(checkpoint, path)
        # Every rank writes into the same temporary folder, named by rank 0.
        save_id, tmp = self.broadcast(
            (new_save_id(), temporary_sibling(path, "partial")) if self.is_global_zero else None
        )
        checkpoint[SAVE_ID] = save_id
        failure: BaseException | None = None
        try:
            if self.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_leftovers(path.parent, path.name)
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            failure = err
        written = self._agree(failure is None)
        if written and self.is_global_zero:
            try:
                if tmp.is_dir():  # a DCP folder; every rank's files are on disk once DCP's save returned
                    write_completion_marker(tmp, save_id, checkpoint.get("global_step", 0))
                publish(tmp, path)
                # Only once a new checkpoint is in place: another save's leftover may be the newest state.
                remove_all_leftovers(path.parent)
            except Exception as err:
                failure = err
        if not self._agree(failure is None):
            if self.is_global_zero and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif self.is_global_zero:
                tmp.unlink(missing_ok=True)
            raise self._write_failure(failure, path, tmp)

    # ------------------------------------------------------------------ loading
    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        decision = None
        if self.is_global_zero:  # one rank decides, so all load the same checkpoint or all stop
            try:
                info, note = checkpoint_to_load(checkpoint_path, trust_pickle=self.trust_checkpoint)
                decision = (str(info.path), note, None, False)
            except CheckpointError as err:
                decision = (None, None, str(err), isinstance(err, UnsafeCheckpointError))
        path, note, problem, unsafe = self.broadcast(decision)
        if problem is not None:
            raise (UnsafeCheckpointError if unsafe else CheckpointError)(problem)
        if note is not None:
            rank_zero_info(f"note: {note}")
        path = Path(path)
        if path.is_dir():
            return self._load_distributed_checkpoint(path)
        # One file, read by Lightning's torch.load: weights-only unless trusted, as the check read it.
        return super().load_checkpoint(
            path, weights_only=not self.trust_checkpoint if weights_only is None else weights_only
        )

    def _load_distributed_checkpoint(self, path: Path) -> dict[str, Any]:
        """Every rank checks its own view of the folder (another node's copy may differ) and reads it through the
        checks (safe_pickle.py: allow-listed `.metadata`, weights-only meta.pt and non-tensor entries, data files
        inside the folder), so a file replaced after a check is never read unchecked. Only the trainable
        parameters are asked for: a LoRA run's frozen base comes from model.pretrained."""
        trust = self.trust_checkpoint
        failure: CheckpointError | None = None
        try:
            if not self.is_global_zero:  # rank 0 checked it in checkpoint_to_load
                inspect_checkpoint(path, trust_pickle=trust)
            saved = read_saved_state(path, trust_pickle=trust)
            reader = dcp_reader(path, trust_pickle=trust)
        except CheckpointError as err:
            failure = err
        if not self._agree(failure is None):
            raise failure or CheckpointError(
                f"{path}: another rank cannot use this checkpoint; see its error"
            )
        check = getattr(self.lightning_module, "check_resumable", None)
        if check is not None:
            check(saved.get("hyper_parameters") or {}, path)
        frozen = self._has_frozen_parameters()
        trainable = StateDictOptions(ignore_frozen_params=frozen)
        state = {"state_dict": get_model_state_dict(self.model, options=trainable)}
        for index, optimizer in enumerate(self.optimizers):
            state[f"optimizer_{index}"] = get_optimizer_state_dict(self.model, optimizer)
        try:
            dcp_load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner(path, trust_pickle=trust))
        except CheckpointException as err:
            cause = checkpoint_failure(err)
            if isinstance(cause, CheckpointError):
                raise cause from err
            raise
        strict = self.lightning_module.strict_loading and not frozen
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=strict))
        for index, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{index}"])
        # As Lightning's load returns it: the non-tensor state, for the loops, callbacks and hooks.
        return saved


# ---------------------------------------------------------------------- in LightningCLI (cli/fit.py)
LIGHTNING_STRATEGY = "lightning.pytorch.strategies.ModelParallelStrategy"


def use_safe_strategy(settings: Any) -> None:
    """Lightning's ModelParallelStrategy named in a subcommand's settings becomes this subclass (same
    arguments), so every run's checkpoints get the checks whatever the config names."""
    strategy = (settings.get("trainer") or {}).get("strategy")
    if getattr(strategy, "class_path", None) == LIGHTNING_STRATEGY:
        strategy.class_path = (
            f"{DeviceModelParallelStrategy.__module__}.{DeviceModelParallelStrategy.__name__}"
        )


def prepare_checkpoint_loading(trainer: Any, settings: Any) -> None:
    """Hand `--trust-checkpoint` to the strategy, and make `--ckpt_path last` the newest complete checkpoint
    of the ModelCheckpoint folders (Lightning's own `last` sees only a `last.ckpt` that exists)."""
    trust = bool(settings.get("trust_checkpoint"))
    if isinstance(trainer.strategy, DeviceModelParallelStrategy):
        trainer.strategy.trust_checkpoint = trust
    folders = [
        callback.dirpath for callback in trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)
    ]
    if settings.get("ckpt_path") != "last" or not folders:
        return
    path, note = resolve_last(folders, trust_pickle=trust)
    if note is not None:
        settings["ckpt_path"] = None if path is None else str(path)
        rank_zero_info(f"note: {note}")


__all__ = [
    "DeviceModelParallelStrategy",
    "prepare_checkpoint_loading",
    "use_safe_strategy",
]
