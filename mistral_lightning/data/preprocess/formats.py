"""Which format a run reads: the one --handler/--handler-name names, or for `--handler auto` the first
whose columns the first input file has (after --columns renames them)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mistral_lightning.data.preprocess.columns import ColumnMapping
from mistral_lightning.data.preprocess.config import PreprocessConfig, PreprocessError
from mistral_lightning.data.preprocess.handlers import (
    DETECTION_ORDER,
    FORMATS,
    HANDLER_CLASSES,
    Handler,
    PretrainHandler,
)
from mistral_lightning.data.preprocess.readers import peek_columns

AUTO = "auto"


def _signature(handler: type[Handler], config: PreprocessConfig) -> set[str]:
    return set(config.json_keys) if handler is PretrainHandler else set(handler.signature)


def resolve_format(config: PreprocessConfig, files: list[Path]) -> tuple[PreprocessConfig, str]:
    """The config with a concrete handler_name, and the summary's line saying which format and why."""
    if config.handler_name != AUTO:
        handler = HANDLER_CLASSES[config.handler_name]
        return config, f"{handler.label} (--handler {handler.name})"
    names = {name for h in DETECTION_ORDER for name in (*h.columns, *h.turn_fields)} | set(config.json_keys)
    mapping = ColumnMapping(config.columns, "any format", sorted(names))
    path, columns = next(((p, c) for p in files if (c := peek_columns(p))), (None, []))
    if path is None:
        raise PreprocessError(f"--handler auto: --input {config.input} has no row to tell the format from")
    found = mapping.rename_columns(columns)
    for handler in DETECTION_ORDER:
        if _signature(handler, config) <= found:
            detected = replace(config, handler_name=FORMATS[handler.name])
            return detected, f"{handler.label} (--handler auto, from the columns of {path})"
    formats = [handler.describe() for handler in DETECTION_ORDER]
    raise PreprocessError(
        f"--handler auto: {path} has columns {', '.join(sorted(columns))}, which match no format: expected "
        f"{', '.join(formats[:-1])} or {formats[-1]}; map yours with --columns TARGET=SOURCE, or choose --handler"
    )
