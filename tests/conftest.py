"""Shared pytest fixtures (the helpers they are built from live in tests/helpers/), the order of the files,
and the guard that keeps processes to tests marked `processes`.

Defined here, each session fixture runs at most once per session, whichever test modules use it.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch

from mistral_lightning.child_processes import safe_path_env
from mistral_lightning.tokenizer import Tokenizer, default_tokenizer_path

# Every process a test starts (`python -m ...`, torchrun, its workers) inherits the safe path, as the
# application's own child processes do; test_safe_paths checks it.
os.environ.update(safe_path_env({}))


def pytest_collection_modifyitems(items):
    """Files with slow tests run first, then files with tests that start processes, then the rest (a stable
    sort keeps each file whole and in order), so under xdist the quick files fill the other worker's time at
    the end instead of one long file running alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    starting_processes = {item.path for item in items if item.get_closest_marker("processes")}
    items.sort(key=lambda item: (item.path not in slow, item.path not in starting_processes))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test that starts a process (in its body or its fixtures) must say so with the `processes` marker,
    so that `make test-fast` (`-m "not processes"`) really starts none."""
    if item.get_closest_marker("processes"):
        return (yield)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a process: mark it @pytest.mark.processes")

    with (
        mock.patch.object(subprocess.Popen, "_execute_child", refuse),
        mock.patch.object(multiprocessing.process.BaseProcess, "start", refuse),
    ):
        return (yield)


# What torchrun sets per rank, as this session started. Lightning's launcher sets LOCAL_RANK in this very
# process during an in-process `fit` (a session fixture's too); left there, a later test's library
# (accelerate, inside lm-eval's HFLM) believes it runs under torchrun.
RANK_VARIABLES = {name: os.environ.get(name) for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}


@pytest.fixture(autouse=True)
def rank_variables_do_not_leak():
    yield
    for name, value in RANK_VARIABLES.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def process_group_does_not_leak():
    """Lightning leaves an in-process fit's process group up; the next test in this worker (a memory plan
    with its own fake group, as in the fresh process a user runs it in) must start without one."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    """The real Mistral v1 sentencepiece model shipped in mistral-common (a test dependency)."""
    path = default_tokenizer_path()
    assert path is not None, "mistral-common is needed for the tests: pip install -e '.[test]'"
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)


# ---------------------------------------------------------------------- training
# helpers.training is imported inside the fixtures: it loads Lightning, which most test modules never need.
@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> str:
    from helpers.training import write_toy_pretrain_data

    return write_toy_pretrain_data(tmp_path_factory.mktemp("toy_data"))


@pytest.fixture(scope="session")
def single_thread():
    # The workers run one thread each; matching them keeps CPU matmuls bit-identical across processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(toy_data, single_thread, tmp_path_factory):
    """TP=1, DP=1: STEPS steps straight, in this process; returns its `Recorder`."""
    from helpers.training import Recorder, datamodule, module, trainer

    recorder = Recorder()
    trainer(tmp_path_factory.mktemp("reference"), callbacks=[recorder]).fit(
        module(), datamodule=datamodule(toy_data)
    )
    return recorder


@pytest.fixture(scope="session")
def killed_checkpoint(toy_data, tmp_path_factory) -> Path:
    """A TP=1 run checkpointed after step 3 and killed as step 4 starts (in its own process)."""
    from helpers.training import launch

    folder = tmp_path_factory.mktemp("killed")
    scenario = {"name": "killed", "data": toy_data, "checkpoint_every": 3, "kill_at_step": 3}
    codes, _, output = launch([scenario], folder, nprocs=1)
    assert codes == [17], output
    return folder / "killed" / "checkpoints" / "step=3.ckpt"
