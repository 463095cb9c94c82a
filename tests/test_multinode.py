"""Multi-node training through Lightning's own launch: two simulated nodes of two processes each
(torchrun --nnodes 2 --node-rank 0|1 on localhost, gloo), TP2 inside a node x DP2 across the nodes,
against the single-process run; and the data index caches the nodes share."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import tiny_fit_config
from helpers.processes import free_port
from helpers.training import SEQ_LENGTH, STEPS, write_toy_pretrain_data

from mistral_lightning.data.datasets import cached_arrays

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
NODES, DEVICES_PER_NODE = 2, 2


def fit_config(data_prefix: str, root: Path) -> dict:
    """`helpers.training`' reference run (tiny model, global batch 2, seq 32, fp32, clip 1.0) as a CLI config
    for 2 nodes x 2 devices: TP2 inside a node, DP2 across nodes, one sample per replica."""
    config = tiny_fit_config(
        root,
        data_prefix,
        data_parallel=NODES,
        tensor_parallel=DEVICES_PER_NODE,
        seq_length=SEQ_LENGTH,
        micro_batch_size=1,
        trainer={
            "devices": DEVICES_PER_NODE,
            "num_nodes": NODES,
            "max_steps": STEPS,
            "gradient_clip_val": 1.0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "logs", "version": 0},
            },
            "callbacks": [
                {"class_path": "helpers.mesh_probe.MeshProbe", "init_args": {"out_dir": str(root / "mesh")}}
            ],
        },
        model={"schedule": {"warmup_fraction": 0.2, "min_lr": 1e-4}},
    )
    return config


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    """Both nodes' torchrun launchers on this machine, one rendezvous; returns the run's folder."""
    root = tmp_path_factory.mktemp("two_nodes")
    # Fresh data, so that the run builds its index caches itself.
    data_prefix = write_toy_pretrain_data(root)
    config = root / "fit.yaml"
    config.write_text(json.dumps(fit_config(data_prefix, root)))  # JSON is YAML
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={NODES}",
                f"--node-rank={node}",
                f"--nproc-per-node={DEVICES_PER_NODE}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "mistral_lightning",
                "fit",
                "--config",
                str(config),
            ],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(NODES)
    ]
    outputs = [launcher.communicate(timeout=540)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-6000:] + outputs[1][-3000:]
    return root


def logged_losses(root: Path) -> list[float]:
    with open(root / "logs" / "version_0" / "metrics.csv") as stream:
        return [float(row["train/loss"]) for row in csv.DictReader(stream) if row.get("train/loss")]


@pytest.mark.processes
def test_two_nodes_log_the_losses_of_one_process(two_nodes, reference):
    losses = logged_losses(two_nodes)
    assert len(losses) == len(reference.losses) == STEPS
    assert losses[0] == pytest.approx(reference.losses[0], rel=1e-5)
    assert losses == pytest.approx(reference.losses, rel=1e-4)


@pytest.mark.processes
def test_each_tensor_parallel_group_stays_inside_one_node(two_nodes):
    ranks = [json.loads(path.read_text()) for path in sorted((two_nodes / "mesh").glob("rank*.json"))]
    assert sorted(rank["global_rank"] for rank in ranks) == list(range(NODES * DEVICES_PER_NODE))
    node_of = {rank["global_rank"]: rank["node_rank"] for rank in ranks}
    for rank in ranks:
        # global rank = node rank x devices per node + local rank, as torchrun and SLURM number them
        assert rank["global_rank"] == rank["node_rank"] * DEVICES_PER_NODE + rank["local_rank"]
        assert {node_of[peer] for peer in rank["tensor_parallel_group"]} == {rank["node_rank"]}
        assert {node_of[peer] for peer in rank["data_parallel_group"]} == set(range(NODES))


@pytest.mark.processes
def test_the_nodes_share_one_complete_index_cache(two_nodes):
    cache = two_nodes / "index-cache"
    names = sorted(path.name for path in cache.iterdir())
    assert names and not [name for name in names if ".tmp" in name], names
    for description_file in cache.glob("*.txt"):
        stem = description_file.stem
        arrays = [name for name in names if name.startswith(f"{stem}_") and name.endswith(".npy")]
        assert arrays, (stem, names)
        for name in arrays:
            np.load(cache / name)  # complete: a torn write would not parse


def test_index_cache_writers_never_share_a_file(tmp_path, monkeypatch):
    """Builders on two nodes can share a filesystem and a process id; each must write its own temporary
    file and rename it, so that no file is written by two processes and readers see whole files only."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    renamed_from: list[str] = []
    replace = os.replace

    def recording_replace(src, dst):
        renamed_from.append(Path(src).name)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    expected = {"sizes": np.arange(7, dtype=np.int64)}

    def build_while_another_node_builds():
        # The other node finds no cache either, builds and writes it while this one is still building.
        cached_arrays(tmp_path, "the same dataset", ["sizes"], lambda: expected)
        return expected

    cached_arrays(tmp_path, "the same dataset", ["sizes"], build_while_another_node_builds)
    npy_sources = [name for name in renamed_from if ".npy" in name]
    assert len(npy_sources) == 2 and len(set(npy_sources)) == 2, renamed_from
    loaded = cached_arrays(tmp_path, "the same dataset", ["sizes"], lambda: pytest.fail("rebuilt"))
    np.testing.assert_array_equal(loaded["sizes"], expected["sizes"])
    assert not [path.name for path in tmp_path.iterdir() if ".tmp" in path.name]
