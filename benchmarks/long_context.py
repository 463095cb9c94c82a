"""Long-context scaling: training tokens/s and peak RSS at 2K..32K with the window fixed at 512.

    python -m mistral_lightning.benchmarks.long_context [--seq 2048 4096 8192 16384 32768]

With a fixed window, attention work per token is constant, so the tokens/s curve should be flat and the
memory linear in the sequence length. Transformers is measured alongside where it fits (see
train_throughput); the plot goes to benchmarks/results/long_context.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mistral_lightning.benchmarks.common import RESULTS_DIR, machine, save_json
from mistral_lightning.benchmarks.report import plot
from mistral_lightning.benchmarks.train_throughput import OURS_ACTIVATION_CHECKPOINTING, compare

SEQ_LENGTHS = [2048, 4096, 8192, 16384, 32768]


def scaling(rows: list[dict]) -> dict:
    """Ours: tokens/s relative to the shortest length, and the memory growth per extra token (bytes)."""
    ours = sorted((row["seq_length"], row["ours"]) for row in rows)
    (first_seq, first), (last_seq, last) = ours[0], ours[-1]
    return {
        "tokens_per_s_relative_to_shortest": {
            seq: round(run["tokens_per_s"] / first["tokens_per_s"], 3) for seq, run in ours
        },
        "bytes_per_extra_token": (last["peak_rss_bytes"] - first["peak_rss_bytes"])
        / max(1, last_seq - first_seq),
    }


def save(rows: list[dict], directory: Path = RESULTS_DIR) -> None:
    save_json("long_context", {"machine": machine(), "scaling": scaling(rows), "rows": rows}, directory)
    plot(rows, directory / "long_context.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=SEQ_LENGTHS)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    save(compare(args.seq, rounds=args.rounds, activation_checkpointing=OURS_ACTIVATION_CHECKPOINTING))


if __name__ == "__main__":
    main()
