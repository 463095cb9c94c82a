"""`mistral-lightning evaluate --task mmlu`: accuracy per subject and overall; JSON file plus a table.

Run it under torchrun to split the questions over processes (one model replica each).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mistral_lightning.devices import accelerator_module
from mistral_lightning.evaluation.mmlu import SCORING_MODES, evaluate_mmlu, format_table
from mistral_lightning.generation.loading import add_model_arguments, load_model, load_tokenizer
from mistral_lightning.kernels.backend import torch_npu
from mistral_lightning.outputs import FileKind, OutputTarget, check_output_file, write_output_file

# A report this command wrote starts as json.dumps of evaluate_mmlu's results does; --overwrite replaces only that.
MMLU_REPORT = FileKind(
    "MMLU report written by evaluate",
    lambda head: head.startswith(b"{") and b'"task": "mmlu"' in head,
)


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
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="encode each prompt as a user turn in the tokenizer's Mistral chat format (mistral-common)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--scoring",
        choices=SCORING_MODES,
        default="logits",
        help="logits: compare the letters' next-token logits; generate: greedily generate one token",
    )
    parser.add_argument("--prefill-chunk-size", type=int, help="prompt tokens per forward pass")
    parser.add_argument("--output", default="mmlu_results.json", help="where to write the JSON report")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --output file that holds a previous MMLU report"
    )
    return parser


def _init_distributed(device: str) -> str:
    """The device this process evaluates on. Under torchrun: the one of the requested type numbered
    LOCAL_RANK, in a process group on the backend PyTorch registers for that type (nccl for cuda, hccl for
    npu, gloo for cpu)."""
    if device.split(":")[0] == "npu":
        torch_npu(needed_by="--device npu")  # registers the npu device type, torch.npu and hccl
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    device_type = torch.device(device).type
    if device_type != "cpu":
        device = f"{device_type}:{os.environ.get('LOCAL_RANK', '0')}"
        accelerator_module(torch.device(device)).set_device(device)
    torch.distributed.init_process_group(torch.distributed.get_default_backend_for_device(device_type))
    return device


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = OutputTarget(Path(args.output), option="--output", overwrite=args.overwrite)
    if _is_rank_zero():
        check_output_file(output, MMLU_REPORT)  # before scoring, so no result is lost to an unwritable path
    device = _init_distributed(args.device)
    try:
        model = load_model(
            args.checkpoint, device=device, dtype=args.dtype, trust_checkpoint=args.trust_checkpoint
        )
        tokenizer = load_tokenizer(
            args.tokenizer_model,
            args.checkpoint,
            vocab_size=model.config.vocab_size,
            trust_checkpoint=args.trust_checkpoint,
        )
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
    if _is_rank_zero():
        results["checkpoint"] = str(args.checkpoint)
        print(format_table(results))
        written = write_output_file(output, MMLU_REPORT, json.dumps(results, indent=2) + "\n")
        print(f"wrote {written}")
    return 0
