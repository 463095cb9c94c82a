"""The checkout never shadows an installed package: no top-level folder of the repository is importable
under its own name, in the test process or in the processes tests start the way the application does.

The reference is Hugging Face's `kernels` package, which transformers imports and which must stay
installed here: were the repository root on `sys.path`, `import kernels` would find our `kernels/` instead.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_lightning.child_processes import safe_path_env

REPO = Path(__file__).resolve().parents[1]
# The package itself is installed in editable mode, so it is the one name allowed to resolve into the checkout.
TOP_LEVEL = sorted(
    path.name
    for path in REPO.iterdir()
    if path.is_dir() and path.name.isidentifier() and path.name != "mistral_lightning"
)
# Where `import name` would find each name on sys.path (PathFinder ignores modules already imported, and
# pytest's own `tests.*` names for the test modules it imports by path).
PROBE = (
    "import importlib.machinery, json, sys\n"
    "def where(name):\n"
    "    spec = importlib.machinery.PathFinder.find_spec(name, sys.path)\n"
    "    return spec and (spec.origin or list(spec.submodule_search_locations)[0])\n"
    "print(json.dumps({name: where(name) for name in sys.argv[1:]}))\n"
)


def in_its_folder(name: str, location: str | None) -> bool:
    """Whether `location` lies in the repository's folder `name`."""
    return location is not None and Path(location).resolve().is_relative_to(REPO / name)


def test_the_repository_has_the_folders_that_could_shadow():
    assert {"kernels", "callbacks", "configs", "benchmarks", "tests"} <= set(TOP_LEVEL)


def test_hugging_faces_kernels_package_is_installed():
    spec = importlib.machinery.PathFinder.find_spec("kernels", sys.path)
    assert spec is not None and not in_its_folder("kernels", spec.origin), spec
    assert hasattr(importlib.import_module("kernels"), "CUDAProperties")  # what transformers imports from it


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_no_top_level_folder_is_importable_in_the_test_process(name):
    spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
    locations = [] if spec is None else [spec.origin, *(spec.submodule_search_locations or [])]
    assert not any(in_its_folder(name, location) for location in locations), (name, locations)


def shadowed_in_a_child(env: dict[str, str]) -> dict[str, str]:
    """The top-level names that resolve into the checkout in `python -c` started from the repository root
    (which puts the root first on sys.path unless the safe path is on)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *TOP_LEVEL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {name: where for name, where in json.loads(done.stdout).items() if in_its_folder(name, where)}


@pytest.mark.processes
def test_the_processes_tests_start_inherit_the_safe_path():
    assert shadowed_in_a_child(dict(os.environ)) == {}


@pytest.mark.processes
def test_the_applications_child_processes_run_with_the_safe_path():
    unsafe = {key: value for key, value in os.environ.items() if key != "PYTHONSAFEPATH"}
    assert shadowed_in_a_child(unsafe)  # the probe can see shadowing where nothing prevents it
    assert shadowed_in_a_child(safe_path_env(unsafe)) == {}
