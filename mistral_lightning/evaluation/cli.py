"""`mistral-lightning evaluate --task mmlu`: accuracy per subject and overall; JSON file plus a table.

Run it under torchrun to split the questions over processes (one model replica each).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mistral_lightning.evaluation.mmlu import SCORING_MODES, evaluate_mmlu, format_table
from mistral_lightning.generation.loading import add_model_arguments, load_model, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning evaluate", description="Evaluate a checkpoint on MMLU."
    )
    parser.add_argument("--task", choices=["mmlu"], default="mmlu")
    parser.add_argument(
        "--data-dir", required=True, help="MMLU folder with dev/ and test/ (or the test/ folder)"
    )
    add_model_arguments(parser)
    parser.add_argument("--shots", type=int, default=5, help="solved dev examples before each question")
    parser.add_argument("--subjects", nargs="+", help="subject names (file stems) to evaluate; default: all")
    parser.add_argument("--chat-template", action="store_true", help="wrap each prompt in [INST] ... [/INST]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--scoring",
        choices=SCORING_MODES,
        default="logits",
        help="logits: compare the letters' next-token logits; generate: greedily generate one token",
    )
    parser.add_argument("--prefill-chunk-size", type=int, help="prompt tokens per forward pass")
    parser.add_argument("--output", default="mmlu_results.json", help="where to write the JSON report")
    return parser


def _init_distributed(device: str) -> str:
    """Under torchrun, join the process group and use this process's GPU; returns the device to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = _init_distributed(args.device)
    try:
        model = load_model(args.checkpoint, device=device, dtype=args.dtype)
        tokenizer = load_tokenizer(args.tokenizer_model, args.checkpoint)
        results = evaluate_mmlu(
            model,
            tokenizer,
            args.data_dir,
            shots=args.shots,
            subjects=args.subjects,
            chat_template=args.chat_template,
            batch_size=args.batch_size,
            scoring=args.scoring,
            prefill_chunk_size=args.prefill_chunk_size,
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        results["checkpoint"] = str(args.checkpoint)
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(format_table(results))
        print(f"wrote {output}")
    return 0
