"""Preprocessing throughput (tokens/s) with 1 and 2 workers on a generated parquet; prints one JSON line.

    python -m mistral_lightning.benchmarks.preprocess_throughput [--rows 100000] [--workers 1 2]

The rows are Alpaca-sized English-like text (30-120 words) drawn from a fixed vocabulary with a fixed seed.
Each run also checks that every worker count wrote byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mistral_lightning.data.preprocess.config import PreprocessConfig
from mistral_lightning.data.preprocess.pipeline import preprocess
from mistral_lightning.tokenizer import default_tokenizer_path

VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if more no out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come"
).split()


def write_corpus(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(VOCABULARY)
    batch = 10_000
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for start in range(0, rows, batch):
            lengths = rng.integers(30, 121, size=min(batch, rows - start))
            texts = [" ".join(rng.choice(words, size=n)) + "." for n in lengths]
            writer.write_table(pa.table({"text": texts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    tokenizer = default_tokenizer_path()
    if tokenizer is None:
        raise SystemExit(
            "install mistral-common (the test extra) for the Mistral tokenizer this benchmark uses"
        )
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        write_corpus(corpus, args.rows)
        for workers in args.workers:
            prefix = Path(tmp) / f"workers{workers}" / "corpus"
            config = PreprocessConfig(
                str(corpus), str(tokenizer), str(prefix), append_eod=True, workers=workers, log_interval=10**9
            )
            summary = preprocess(config)
            results[f"workers_{workers}"] = {
                "seconds": round(summary.seconds, 2),
                "tokens": summary.tokens,
                "tokens_per_s": round(summary.tokens / summary.seconds),
                "docs_per_s": round(summary.documents / summary.seconds),
            }
            outputs[workers] = [Path(p).read_bytes() for p in summary.outputs]
    identical = all(files == outputs[args.workers[0]] for files in outputs.values())
    print(
        json.dumps(
            {
                "benchmark": "preprocess_throughput",
                "rows": args.rows,
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "byte_identical": identical,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
