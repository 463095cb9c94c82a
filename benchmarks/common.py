"""What every training benchmark shares: the bench model, random token data, worker processes, the machine.

Each measurement runs in a fresh worker process so that its peak RSS (the kernel's high-water mark) is its
own: `run_worker` starts `python -m <module> --worker ...` and reads back the JSON it writes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np

from mistral_lightning.child_processes import python_module_command, safe_path_env
from mistral_lightning.config import MistralConfig

# The bench config: ~60M parameters, vocab 32000, window 512, rope theta 1e6, untied.
BENCH_CONFIG = MistralConfig(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1792,
    num_layers=8,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    rope_theta=1e6,
    sliding_window=512,
    max_seq_length=32768,
)
# A few-MB model for smoke runs of the harness itself (no figures are read from it).
TINY_CONFIG = MistralConfig.from_name("tiny")

RESULTS_DIR = Path(__file__).parent / "results"


def write_random_tokens(directory: Path, seq_length: int, num_samples: int, seed: int = 0) -> str:
    """A Megatron indexed dataset of `num_samples` random documents of seq_length + 1 tokens; returns its prefix.

    One document per sample, so the real data path yields exactly one whole document per batch.
    """
    from mistral_lightning.data.indexed import IndexedDatasetWriter, token_dtype

    prefix = directory / f"random_{seq_length}_text_document"
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, token_dtype(BENCH_CONFIG.vocab_size)) as writer:
        for _ in range(num_samples):
            writer.add_document(rng.integers(3, BENCH_CONFIG.vocab_size, seq_length + 1))
        writer.finalize()
    return str(prefix)


def run_worker(module: str, args: list[str], cwd: Path | None = None, threads: int | None = None) -> dict:
    """Run `python -m module --worker ... --out FILE` in a fresh process and return the JSON it wrote.

    `threads` caps torch's intra-op threads (OMP_NUM_THREADS): on a machine shared with other jobs, every
    parallel operator otherwise waits for a time slice for each of its threads.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = python_module_command(module, "--worker", *args, "--out", str(out))
        env = safe_path_env({**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None)
        completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
        if completed.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmark worker failed ({' '.join(command)}):\n{completed.stderr[-4000:]}")
        return json.loads(out.read_text())


def write_worker_result(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result))


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number elsewhere, so nothing is skipped."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def machine() -> dict:
    """CPU model, core count, load and library versions: what a reader needs to judge the figures."""
    import lightning
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def save_json(name: str, payload: dict, directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


class StepTimes(L.Callback):
    """Each rank writes `times{N}.json`: the wall-clock seconds of every optimizer step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"times{trainer.global_rank}.json").write_text(json.dumps(self.times))
