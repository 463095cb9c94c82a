"""Hugging Face PEFT's LoRA adapter folders (`adapter_model.safetensors` + `adapter_config.json`), read and written.

Tensor names are the ones PEFT saves for transformers' MistralForCausalLM: `base_model.model.` + the HF module
name + `.lora_A.weight` / `.lora_B.weight`, the HF module names coming from checkpoint/hf.py's table. A folder
written here loads with `PeftModel.from_pretrained(base, folder)` unchanged; a folder PEFT wrote loads here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from mistral_lightning.adapters.lora import (
    LORA_TARGETS,
    LoRAConfig,
    LoRAError,
    apply_lora,
    is_adapter_parameter,
    lora_layers,
)
from mistral_lightning.checkpoint.base import Index, local_chunk
from mistral_lightning.checkpoint.hf import to_hf_name
from mistral_lightning.checkpoint.lightning_ckpt import parameter_name
from mistral_lightning.config import MistralConfig, parameter_shapes
from mistral_lightning.outputs import FolderKind, OutputFolder, OutputTarget, as_target

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
BASE_LAYER = "base_layer"  # PEFT saves a targeted lm_head's own weight under this name
PEFT_OUTPUT = FolderKind(
    "PEFT adapter folder", patterns=(ADAPTER_WEIGHTS, ADAPTER_CONFIG), required=ADAPTER_CONFIG
)
# adapter_config.json, as PEFT's LoraConfig reads it: the settings read here, the ones that change nothing
# once the saved tensors are loaded (or only matter with a setting refused below), and those whose plain-LoRA
# value is not empty. Any other setting must be empty (None, false, [], {}): each one PEFT adds changes what
# the adapter computes (DoRA, rsLoRA, aLoRA's invocation tokens, per-layer ranks, ...), so it is refused by name.
_READ_HERE = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "init_lora_weights"}
_NO_EFFECT = {
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "auto_mapping",
    "peft_version",
    "runtime_config",
    "layers_pattern",  # with layers_to_transform only
    "megatron_core",  # with megatron_config only
    "qalora_group_size",  # with use_qalora only
    "loftq_config",  # the initialisations, with init_lora_weights of their name only
    "eva_config",
    "corda_config",
    "lora_ga_config",
}
_PLAIN_LORA = {"bias": "none"}
# init_lora_weights values that only initialise the adapters, which the saved tensors replace; the others
# (pissa, olora, corda, loftq, ...) change the base weights as PEFT loads the adapter.
_ADAPTER_ONLY_INIT = [True, False, "gaussian"]
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer


class AdapterError(LoRAError):
    """An adapter folder or checkpoint that cannot be read, or does not fit the base model."""


def _module(parameter: str) -> str:
    return parameter.removesuffix(".weight")


def peft_module_name(layer: str) -> str:
    """Our layer name -> PEFT's saved module prefix: 'layers.0.attn.q' -> 'base_model.model.model.layers.0.self_attn.q_proj'."""
    return PEFT_PREFIX + _module(to_hf_name(f"{layer}.weight"))


def adapter_shapes(model_config: MistralConfig, lora: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """The adapter tensors `lora` adds to a model of `model_config`, by our names, with their shapes."""
    shapes = {}
    for name, (rows, columns) in _target_weights(model_config, lora.targets).items():
        shapes[f"{_module(name)}.lora_A.weight"] = (lora.rank, columns)
        shapes[f"{_module(name)}.lora_B.weight"] = (rows, lora.rank)
    return shapes


def _target_weights(model_config: MistralConfig, targets: Iterable[str]) -> dict[str, tuple[int, ...]]:
    targets = set(targets)
    return {
        name: shape
        for name, shape in parameter_shapes(model_config).items()
        if _module(name).rpartition(".")[2] in targets
    }


def _peft_names(model_config: MistralConfig) -> dict[str, str]:
    """Every name a PEFT LoRA file for this architecture may hold -> our name (adapters and saved base layers)."""
    names = {}
    for name in _target_weights(model_config, LORA_TARGETS):
        module = peft_module_name(_module(name))
        for part in ("lora_A", "lora_B"):
            names[f"{module}.{part}.weight"] = f"{_module(name)}.{part}.weight"
        names[f"{module}.{BASE_LAYER}.weight"] = name
    return names


class AdapterWeights:
    """LoRA adapter tensors by our names, from a PEFT folder or a `fit` checkpoint, checked against a base.

    `read(name, index)` returns one tensor or a slice of it; `base_weights` are base weights the adapter
    replaces (a targeted lm_head PEFT saved with its adapter).
    """

    def __init__(
        self,
        path: Path,
        lora: LoRAConfig,
        stored: dict[str, str],
        shape: Callable[[str], tuple[int, ...]],
        read: Callable[[str, Index | None], torch.Tensor],
        model_config: MistralConfig,
    ) -> None:
        self.path, self.lora, self._stored, self._shape, self._read = path, lora, stored, shape, read
        self.adapter_names = [name for name in stored if is_adapter_parameter(name)]
        self.base_weights = [name for name in stored if not is_adapter_parameter(name)]
        self._check(model_config)

    def stored_name(self, name: str) -> str:
        return self._stored[name]

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        return self._read(self._stored[name], index)

    def _check(self, model_config: MistralConfig) -> None:
        """Every adapter of the targets present, none other, and each of the base's shapes; one line if not."""
        expected = adapter_shapes(model_config, self.lora)
        expected.update(parameter_shapes(model_config))
        missing = [name for name in adapter_shapes(model_config, self.lora) if name not in self._stored]
        if missing:
            raise AdapterError(
                f"{self.path}: adapters for {list(self.lora.targets)} but no tensor for {missing[0]!r} "
                f"({len(missing)} missing); a LoRA adapter must cover every layer of its targets"
            )
        for name, stored in self._stored.items():
            found, wanted = tuple(self._shape(stored)), expected.get(name)
            if found != wanted:
                raise AdapterError(
                    f"{self.path}: tensor {stored!r} has shape {list(found)} but the base model needs "
                    f"{list(wanted) if wanted else 'no such tensor'}; this adapter was made for another base "
                    "model (or another rank): load it onto the model it was trained on"
                )


def open_peft_adapter(folder: str | Path, model_config: MistralConfig) -> AdapterWeights:
    """A PEFT LoRA folder (written here or by PEFT's save_pretrained), checked against a base of `model_config`:
    loaded as PEFT loads it, or refused in one line naming the setting it cannot honour."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(
            f"{folder}: no {ADAPTER_CONFIG}, so not a PEFT adapter folder; pass the folder that "
            "`export --lora-format peft` or PEFT's save_pretrained wrote"
        )
    lora_config = _read_config(config_file)
    selected = _selected_modules(lora_config, model_config, config_file)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(
            f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}; save the adapter with safetensors "
            "(PEFT's default) or copy the file again"
        )
    try:
        with safe_open(weights, "pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: not a readable safetensors file ({err}); copy it again") from err
    ours = _peft_names(model_config)
    unknown = sorted(name for name in shapes if name not in ours)
    if unknown:
        raise AdapterError(
            f"{weights}: holds {len(unknown)} tensor(s) a LoRA adapter of this Mistral base has no place for (e.g. "
            f"{unknown[0]!r}); it was made for another architecture or with a PEFT feature not supported here"
        )
    # PEFT loads a tensor only into a module target_modules selects (a base_layer weight too):
    # 'base_model.model.<module>.lora_A.weight', 'base_model.model.<module>.base_layer.weight'.
    unselected = sorted(
        name for name in shapes if name.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0] not in selected
    )
    if unselected:
        raise AdapterError(
            f"{weights}: holds {unselected[0]!r} ({len(unselected)} such), for a module the target_modules "
            f"{lora_config['target_modules']!r} of {ADAPTER_CONFIG} does not select, so PEFT would not load it; "
            "add the module to target_modules or save the adapter again"
        )
    # The target of 'layers.0.attn.q' is 'q'; of 'lm_head', 'lm_head'.
    chosen = {layer.rpartition(".")[2] for layer in selected.values()}
    lora = LoRAConfig(
        rank=lora_config["r"],
        alpha=lora_config["lora_alpha"],
        dropout=lora_config.get("lora_dropout", 0.0),
        targets=tuple(target for target in LORA_TARGETS if target in chosen),
    )
    stored = {ours[name]: name for name in shapes}

    def read(name: str, index: Index | None) -> torch.Tensor:
        with safe_open(weights, "pt") as handle:
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]

    return AdapterWeights(folder, lora, stored, shapes.__getitem__, read, model_config)


def _peft_selects(pattern: str | list[str], key: str) -> bool:
    """Whether PEFT's `target_modules` (or `exclude_modules`) `pattern` selects the module named `key`: a string
    is a regular expression over the whole name, a list names modules or their last parts
    (peft.tuners.tuners_utils.check_target_module_exists)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return key in pattern or any(key.endswith(f".{name}") for name in pattern)


def _is_pattern(value: object) -> bool:
    """A value PEFT takes for target_modules or exclude_modules: a regular expression or a list of names."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )


def _selected_modules(config: dict, model_config: MistralConfig, config_file: Path) -> dict[str, str]:
    """The modules of transformers' MistralForCausalLM that `target_modules` (less `exclude_modules`) puts
    adapters on, HF name -> our layer name; refused unless they are whole targets: every layer of a kind."""
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    setting = f"{config_file}: target_modules={targets!r}"
    if not _is_pattern(targets) or not (excluded is None or _is_pattern(excluded)):
        raise AdapterError(
            f"{setting}, exclude_modules={excluded!r}: PEFT takes a list of module names or a regular expression"
        )
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    # Every module with a parameter, and each module above one: PEFT matches them all.
    layers: dict[str, str | None] = {}
    for name in parameter_shapes(model_config):
        module, layer = _module(to_hf_name(name)), _module(name)
        layers[module] = layer if layer.rpartition(".")[2] in LORA_TARGETS else None
        while "." in module:
            module = module.rpartition(".")[0]
            layers.setdefault(module, None)

    def chosen(module: str, layer: str | None) -> bool:
        hit = layer not in (None, "lm_head") if all_linear else _peft_selects(targets, module)
        return hit and not (excluded and _peft_selects(excluded, module))

    try:
        selected = {module: layer for module, layer in layers.items() if chosen(module, layer)}
    except re.error as err:
        raise AdapterError(f"{setting}: not a regular expression ({err})") from err
    if not selected:
        raise AdapterError(
            f"{setting} selects no module of this Mistral base, so there is no adapter to load"
        )
    others = [module for module, layer in selected.items() if layer is None]
    if others:
        raise AdapterError(
            f"{setting} selects {others[0]}, which takes no LoRA adapter here (only the linear layers "
            f"{list(LORA_TARGETS)} do)"
        )
    for kind in {layer.rpartition(".")[2] for layer in selected.values()}:
        every = [layer for layer in layers.values() if layer and layer.rpartition(".")[2] == kind]
        chosen_here = [layer for layer in selected.values() if layer.rpartition(".")[2] == kind]
        if len(chosen_here) != len(every):
            raise AdapterError(
                f"{setting} (exclude_modules={excluded!r}) selects {len(chosen_here)} of the {len(every)} "
                f"{kind!r} layers; an adapter loads here only on every layer of each kind it targets"
            )
    return selected


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_file}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{config_file}: peft_type is {found!r}; only LORA adapters can be loaded")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise AdapterError(f"{config_file}: r is {rank!r}; a LoRA config needs a positive integer")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise AdapterError(f"{config_file}: lora_alpha is {alpha!r}; a LoRA config needs a finite number")
    init = config.get("init_lora_weights", True)
    if not any(init is value if isinstance(value, bool) else init == value for value in _ADAPTER_ONLY_INIT):
        raise AdapterError(
            f"{config_file}: init_lora_weights={init!r} is not supported (PEFT changes the base weights with it "
            f"as it loads the adapter); only {_ADAPTER_ONLY_INIT} load here"
        )
    for key, value in config.items():
        plain = _PLAIN_LORA.get(key)
        if key in _READ_HERE or key in _NO_EFFECT or value == plain or value in (None, False, [], {}):
            continue
        raise AdapterError(
            f"{config_file}: {key}={value!r} is not supported (only plain LoRA: {key}={plain!r}); "
            "train the adapter without it"
        )
    return config


def peft_config(lora: LoRAConfig, target_modules: Iterable[str], base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for PEFT's LoraConfig: plain LoRA on the HF modules named `target_modules`."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(set(target_modules)),
        "inference_mode": True,
        "init_lora_weights": True,
        "revision": None,
        **_PLAIN_LORA,
    }


def write_peft_folder(
    tensors: Iterable[tuple[str, torch.Tensor]],
    lora: LoRAConfig,
    out: OutputTarget | str | Path,
    *,
    base_model_name_or_path: str | None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    is_writer: bool = True,
) -> Path:
    """Write (our adapter name, tensor) pairs as a PEFT folder under a temporary name, published when complete
    (outputs.py's rules: `overwrite` replaces only a previous PEFT adapter folder). Every rank iterates the
    tensors (they may be gathered); only `is_writer` writes."""
    target = as_target(out, overwrite=overwrite)
    folder = OutputFolder(target, PEFT_OUTPUT) if is_writer else nullcontext()
    with folder as tmp:
        saved = {}
        for name, tensor in tensors:
            if is_writer:
                layer = _module(name).rpartition(".")[0]
                saved[f"{peft_module_name(layer)}.{name.split('.')[-2]}.weight"] = (
                    tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
                )
        if is_writer:
            save_file(saved, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            modules = [
                name.split(".")[-3] for name in saved
            ]  # '...self_attn.q_proj.lora_A.weight' -> 'q_proj'
            config = peft_config(lora, modules, base_model_name_or_path)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return target.path


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig a model's adapters were applied with, read back from its LoRA layers."""
    layers = list(lora_layers(model))
    if not layers:
        raise AdapterError("the model has no LoRA adapters to save; apply LoRA (model.lora) first")
    _, first = layers[0]
    rank = first.lora_A.out_features
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = {parameter_name(name).rpartition(".")[2] for name, _ in layers}
    return LoRAConfig(
        rank=rank,
        alpha=first.scaling * rank,
        dropout=dropout,
        targets=tuple(t for t in LORA_TARGETS if t in targets),
    )


def save_peft_adapter(
    model: nn.Module,
    folder: OutputTarget | str | Path,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    is_writer: bool = True,
) -> Path:
    """Write `model`'s LoRA adapters as a PEFT folder. Sharded (DTensor) adapters are gathered one at a time,
    so every rank must call this; only `is_writer` writes."""
    lora = lora_config_of(model)

    def adapters() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in model.state_dict().items():
            if is_adapter_parameter(name):
                yield parameter_name(name), tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    return write_peft_folder(
        adapters(),
        lora,
        folder,
        base_model_name_or_path=base_model_name_or_path,
        dtype=dtype,
        overwrite=overwrite,
        is_writer=is_writer,
    )


@torch.no_grad()
def load_peft_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Fill `model`'s adapters from a PEFT folder, applying LoRA from its adapter_config.json first if the
    model has none; a DTensor adapter reads only its rank's slice. Everything is checked before any write."""
    adapter = open_peft_adapter(folder, model.config)
    if not any(True for _ in lora_layers(model)):
        apply_lora(model, adapter.lora)
    applied = lora_config_of(model)
    if (applied.targets, applied.rank, applied.scaling) != (
        adapter.lora.targets,
        adapter.lora.rank,
        adapter.lora.scaling,
    ):
        raise AdapterError(
            f"{adapter.path}: adapter of rank {adapter.lora.rank}, alpha {adapter.lora.alpha} on "
            f"{list(adapter.lora.targets)}, but the model's LoRA has rank {applied.rank}, alpha {applied.alpha} on "
            f"{list(applied.targets)}; set model.lora to the adapter's values"
        )
    params = {parameter_name(name): param for name, param in model.named_parameters()}
    for name in (*adapter.adapter_names, *adapter.base_weights):
        param = params[name]
        index = local_chunk(param)
        local = param if index is None else param.to_local()
        local.copy_(adapter.read(name, index))
    return adapter.lora


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_OUTPUT",
    "AdapterError",
    "AdapterWeights",
    "adapter_shapes",
    "load_peft_adapter",
    "lora_config_of",
    "open_peft_adapter",
    "peft_config",
    "save_peft_adapter",
    "write_peft_folder",
]
