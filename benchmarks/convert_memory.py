"""Peak memory and wall time of `mistral-lightning convert` on a random ~1B-parameter model; prints JSON.

    python -m mistral_lightning.benchmarks.convert_memory [--layers 16] [--hidden 2048] [--workdir DIR]

HF (bf16 safetensors) -> Megatron TP8 -> HF, each conversion in its own process. Reported per run:
wall seconds, peak RSS (the kernel's high-water mark, which also counts memory-mapped checkpoint
pages the kernel can drop at will) and peak anonymous RSS (sampled every 10 ms: the memory the
conversion really holds), each also as a fraction of the model's size on disk. The last HF is
checked to equal the first, tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from mistral_lightning.checkpoint.hf import SAFETENSORS_FILE, SAFETENSORS_INDEX
from mistral_lightning.config import MistralConfig

# With no arguments the child only imports the converter: the baseline every run pays.
CHILD = """
import json, sys
from mistral_lightning.cli import convert
code = convert.main(sys.argv[1:]) if sys.argv[1:] else 0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"peak_rss_kb": int(status["VmHWM"].split()[0]), "code": code}))
"""


def write_random_hf(config: MistralConfig, path: Path) -> None:
    """Built on the meta device and filled in bf16, so that creating it costs one copy of the model."""
    from mistral_lightning.model import Mistral

    with torch.device("meta"):
        model = Mistral(config).to(torch.bfloat16)
    model.to_empty(device="cpu").init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(path, max_shard_bytes=1024**3)


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_convert(argv: list[str]) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, text=True)
    peak_anon = 0
    while child.poll() is None:
        peak_anon = max(peak_anon, _anon_kb(child.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    lines = child.stdout.read().splitlines()
    if child.returncode != 0:
        raise SystemExit(f"convert {' '.join(argv)} failed:\n" + "\n".join(lines))
    result = json.loads(lines[-1])
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(result["peak_rss_kb"] / 1e6, 2),
        "peak_anon_gb": round(peak_anon / 1e6, 2),
    }


def hf_files(path: Path) -> list[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [path / SAFETENSORS_FILE]


def same_weights(a: Path, b: Path) -> bool:
    def tensors(path: Path) -> dict[str, Path]:
        out = {}
        for file in hf_files(path):
            with safe_open(file, "pt") as handle:
                out.update(dict.fromkeys(handle.keys(), file))  # noqa: SIM118
        return out

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(left[name], "pt") as x, safe_open(right[name], "pt") as y:
            if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    config = MistralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.hidden // 128,
        num_kv_heads=8,
        head_dim=128,
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf, mg, back, back_small = (
            Path(tmp) / name for name in ("hf", "megatron", "hf_back", "hf_back_small")
        )
        write_random_hf(config, hf)
        model_gb = sum(f.stat().st_size for f in hf_files(hf)) / 1e9
        runs = {
            f"hf_to_megatron_tp{args.tp}": ["--loader", "hf", "--saver", "megatron", "--load-dir", str(hf),
                                            "--save-dir", str(mg), "--target-tensor-parallel-size", str(args.tp)],
            f"megatron_tp{args.tp}_to_hf": ["--loader", "megatron", "--saver", "hf", "--load-dir", str(mg),
                                            "--save-dir", str(back)],
            f"megatron_tp{args.tp}_to_hf_0.5gb_shards": ["--loader", "megatron", "--saver", "hf", "--load-dir",
                                                         str(mg), "--save-dir", str(back_small),
                                                         "--max-shard-size-gb", "0.5"],
        }  # fmt: skip
        results = {"baseline_python_torch_import": run_convert([])}
        for name, argv in runs.items():
            result = run_convert(argv)
            result["peak_rss_x_model"] = round(result["peak_rss_gb"] / model_gb, 2)
            result["peak_anon_x_model"] = round(result["peak_anon_gb"] / model_gb, 2)
            results[name] = result
        identical = same_weights(hf, back) and same_weights(hf, back_small)
    print(
        json.dumps(
            {
                "params_billion": round(config.num_params / 1e9, 3),
                "model_gb_bf16": round(model_gb, 2),
                "round_trip_bit_identical": identical,
                "runs": results,
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
