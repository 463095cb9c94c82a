"""`mistral-lightning evaluate`: the recipe's MMLU (`--task mmlu`, the default) or lm-evaluation-harness tasks
(`--harness --tasks ...`); a table, and a JSON file.

Run it under torchrun to split the questions over processes (one model replica each). The parser is
torch-free, so `--help` is quick; the model stack is imported after parsing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mistral_lightning.cli.options import DefaultsHelpFormatter, add_model_arguments, inference_settings
from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.mmlu_data import SCORING_MODES
from mistral_lightning.outputs import FileKind, OutputTarget, check_output_file, user_path, write_output_file

# A report this command wrote starts as json.dumps of evaluate_mmlu's results does; --overwrite replaces only that.
MMLU_REPORT = FileKind(
    "MMLU report written by evaluate",
    lambda head: head.startswith(b"{") and b'"task": "mmlu"' in head,
)
LM_EVAL_MISSING = "evaluate --harness needs lm-eval: pip install 'mistral-lightning[eval]'"


class MissingExtraError(UserError):
    """An optional dependency the requested feature needs is not installed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning evaluate",
        description="Evaluate a checkpoint on MMLU (the recipe's own scoring) or on lm-evaluation-harness tasks.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--task", choices=["mmlu"], default="mmlu", help="the recipe's own evaluation")
    parser.add_argument(
        "--data-dir",
        type=user_path,
        help="MMLU folder with dev/ and test/ (or the test/ folder); --task mmlu",
    )
    add_model_arguments(parser)
    parser.add_argument("--shots", type=int, default=5, help="solved dev examples before each question")
    parser.add_argument("--subjects", nargs="+", help="subject names (file stems) to evaluate; default: all")
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="encode each prompt as a user turn in the tokenizer's Mistral chat format (mistral-common)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument(
        "--scoring",
        choices=SCORING_MODES,
        default="logits",
        help="logits: compare the letters' next-token logits; generate: greedily generate one token",
    )
    parser.add_argument(
        "--prefill-chunk-size", type=int, help="prompt tokens per forward pass; default: the whole prompt"
    )
    parser.add_argument(
        "--output",
        type=user_path,
        help="the JSON report; default: mmlu_results.json, or harness_results.json with --harness",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --output file that holds a previous report"
    )
    harness = parser.add_argument_group("lm-evaluation-harness (pip install 'mistral-lightning[eval]')")
    harness.add_argument("--harness", action="store_true", help="run lm-eval tasks instead of --task mmlu")
    harness.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    harness.add_argument(
        "--num-fewshot", type=int, help="examples before each question; default: the task's own"
    )
    harness.add_argument(
        "--limit",
        type=float,
        help="at most this many documents per task (below 1: this fraction of them); default: all",
    )
    harness.add_argument(
        "--include-path", type=user_path, help="a folder of your own task YAML files, beside lm-eval's tasks"
    )
    return parser


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    harness_only = {"--tasks": args.tasks, "--num-fewshot": args.num_fewshot, "--limit": args.limit}
    harness_only["--include-path"] = args.include_path
    if args.harness:
        if not args.tasks:
            parser.error("--harness needs --tasks (comma-separated lm-eval task names)")
    elif given := [option for option, value in harness_only.items() if value is not None]:
        parser.error(f"{', '.join(given)} need --harness")
    elif not args.data_dir:
        parser.error("--task mmlu needs --data-dir (the MMLU folder with dev/ and test/)")


def _harness_module():
    """evaluation.harness.run, or one line saying how to install lm-eval."""
    try:
        from mistral_lightning.evaluation.harness import run
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "lm_eval":
            raise
        raise MissingExtraError(LM_EVAL_MISSING) from None
    return run


def _limit(value: float | None) -> float | int | None:
    """lm-eval's --limit: a count when whole, else a fraction."""
    return int(value) if value is not None and value >= 1 and value.is_integer() else value


def _evaluate_harness(args: argparse.Namespace) -> int:
    import torch

    from mistral_lightning.evaluation.ranks import init_distributed, is_rank_zero
    from mistral_lightning.generation.loading import load_for_inference, resolve_device

    harness = _harness_module()
    output = OutputTarget(
        Path(args.output or "harness_results.json"), option="--output", overwrite=args.overwrite
    )
    if is_rank_zero():
        check_output_file(output, harness.HARNESS_REPORT)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    manager = harness.task_manager(tasks, args.include_path)  # an unknown task is named before any loading
    device = init_distributed(resolve_device(args.device))
    try:
        model, tokenizer = load_for_inference(inference_settings(args, device))
        lm = harness.MistralLightningLM(
            model,
            tokenizer,
            batch_size=args.batch_size,
            prefill_chunk_size=args.prefill_chunk_size,
            checkpoint=str(args.checkpoint),
        )
        results = harness.evaluate_harness(
            lm, tasks, manager, num_fewshot=args.num_fewshot, limit=_limit(args.limit)
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if results is not None:  # rank 0
        harness.write_report(output, results, str(args.checkpoint))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_mode(parser, args)
    if args.harness:
        return _evaluate_harness(args)
    import torch

    from mistral_lightning.evaluation.mmlu import evaluate_mmlu, format_table
    from mistral_lightning.evaluation.ranks import init_distributed, is_rank_zero
    from mistral_lightning.generation.loading import load_for_inference, resolve_device

    output = OutputTarget(
        Path(args.output or "mmlu_results.json"), option="--output", overwrite=args.overwrite
    )
    if is_rank_zero():
        check_output_file(output, MMLU_REPORT)  # before scoring, so no result is lost to an unwritable path
    device = init_distributed(resolve_device(args.device))
    try:
        model, tokenizer = load_for_inference(inference_settings(args, device))
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
    if is_rank_zero():
        results["checkpoint"] = str(args.checkpoint)
        print(format_table(results))
        written = write_output_file(output, MMLU_REPORT, json.dumps(results, indent=2) + "\n")
        print(f"wrote {written}")
    return 0
