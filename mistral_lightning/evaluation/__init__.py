"""Evaluation: MMLU accuracy (k-shot, letter-logit or 1-token generation scoring)."""

from mistral_lightning.evaluation.mmlu import evaluate_mmlu, format_table
from mistral_lightning.evaluation.mmlu_data import MMLUDataError, build_prompt, load_mmlu

__all__ = ["MMLUDataError", "build_prompt", "evaluate_mmlu", "format_table", "load_mmlu"]
