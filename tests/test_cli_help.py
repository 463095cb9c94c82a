"""`mistral-lightning <command> --help`: starts without importing torch and shows each option's default."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

# The entry point, then whether torch was imported, in a fresh interpreter (--help exits through SystemExit).
HELP_PROBE = (
    "import sys\n"
    "from mistral_lightning.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('TORCH IMPORTED' if 'torch' in sys.modules else 'TORCH NOT IMPORTED')\n"
)

# An option of each command that has a default, and how argparse's ArgumentDefaultsHelpFormatter shows it.
KNOWN_DEFAULTS = {
    "generate": "--max-new-tokens",
    "evaluate": "--shots",
    "export": "--lora-format",
    "convert": "--max-shard-size-gb",
    "serve": "--port",
    "preprocess": "--tokenizer-type",
    "demo-data": "--train-rows",
}
EXPECTED_DEFAULTS = {
    "generate": "(default: 256)",
    "evaluate": "(default: 5)",
    "export": "(default: merged)",
    "convert": "(default: 5.0)",
    "serve": "(default: 8000)",
    "preprocess": "(default: PretrainedFromHF)",
    "demo-data": "(default: 4000)",
}


def _help(command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.processes
@pytest.mark.parametrize("command", [*KNOWN_DEFAULTS, "configs"])
def test_help_does_not_import_torch(command):
    output = _help(command)
    assert output.rstrip().endswith("TORCH NOT IMPORTED"), output[-2000:]


def _option_help(help_text: str, option: str) -> str:
    """The help of one option: its line in the options list and the wrapped lines under it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {option}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 10)), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.processes
@pytest.mark.parametrize("command", list(KNOWN_DEFAULTS))
def test_help_shows_defaults_and_no_none_for_required_options(command):
    help_text = _help(command)
    assert EXPECTED_DEFAULTS[command] in _option_help(help_text, KNOWN_DEFAULTS[command]), help_text
    assert "(default: None)" not in help_text


def test_dtype_names_are_the_dtypes_config_knows():
    from mistral_lightning.config import DTYPES
    from mistral_lightning.option_values import DTYPE_NAMES

    assert DTYPE_NAMES == tuple(DTYPES)


def _fake_torch_npu(monkeypatch, available: bool) -> None:
    import importlib.machinery
    import types

    import torch

    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: available), raising=False)


def test_device_auto_is_cuda_then_npu_then_cpu(monkeypatch):
    import torch

    from mistral_lightning.generation.loading import resolve_device

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_torch_npu(monkeypatch, available=False)
    assert resolve_device("auto") == "cpu"
    _fake_torch_npu(monkeypatch, available=True)
    assert resolve_device("auto") == "npu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"
