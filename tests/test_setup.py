"""What `make` installs: the CPU build of torch on a machine without an NVIDIA GPU, and a lock of exact pins
(requirements/lock.txt) that leaves torch to the Makefile, which picks the build per device."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
from pathlib import Path

import torch

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
GPU_LIBRARIES = re.compile(r"^(nvidia-|cuda-|triton$)")


def test_torch_is_the_cpu_build_with_no_cuda_library_unless_the_machine_has_an_nvidia_gpu():
    installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    cuda_libraries = sorted(name for name in installed if GPU_LIBRARIES.match(name))
    if shutil.which("nvidia-smi"):
        assert torch.version.cuda is not None, torch.__version__
    else:
        assert torch.version.cuda is None and torch.__version__.endswith("+cpu"), torch.__version__
        assert not cuda_libraries


def test_the_lock_pins_exact_versions_and_leaves_torch_to_the_makefile():
    pins = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert len(pins) > 50  # the whole environment, not a few top-level names
    names = [line.split("==")[0].lower().replace("_", "-") for line in pins]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", line) for line in pins), pins
    assert "torch" not in names and not [name for name in names if GPU_LIBRARIES.match(name)]
    assert {"transformers", "kernels", "lightning", "mistral-common"} <= set(names)
