"""`mistral-lightning evaluate --harness`: lm-eval tasks on a checkpoint; lm-eval's table, its results as JSON."""

from __future__ import annotations

import json

from lm_eval.evaluator import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from mistral_lightning.errors import UserError
from mistral_lightning.evaluation.harness.model import MistralLightningLM
from mistral_lightning.outputs import FileKind, OutputTarget, write_output_file

REPORT_TASK = "lm-eval-harness"
# A report this command wrote starts with its "task" key; --overwrite replaces only that.
HARNESS_REPORT = FileKind(
    "lm-eval report written by evaluate --harness",
    lambda head: head.startswith(b"{") and f'"task": "{REPORT_TASK}"'.encode() in head,
)


class HarnessTaskError(UserError):
    """A task name that neither lm-eval nor --include-path knows."""


def task_manager(tasks: list[str], include_path: str | None) -> TaskManager:
    """lm-eval's task index. Indexing its ~15,000 built-in tasks takes seconds, so when --include-path holds
    every task asked for, only that folder is indexed."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([task]) for task in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        where = f"lm-eval's tasks or --include-path {include_path}" if include_path else "lm-eval's tasks"
        raise HarnessTaskError(
            f"--tasks {','.join(unknown)}: not in {where}; `python -m mistral_lightning.evaluation.harness ls "
            "tasks` lists them, and --include-path adds a folder of task YAML files"
        )
    return manager


def evaluate_harness(
    lm: MistralLightningLM,
    tasks: list[str],
    manager: TaskManager,
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
) -> dict | None:
    """lm-eval's results for `tasks` (None on ranks other than 0, as lm-eval returns them)."""
    return simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
    )


def report(results: dict, checkpoint: str) -> str:
    """The JSON report: our marker and the checkpoint, then lm-eval's results as lm-eval writes them."""
    return json.dumps(
        {"task": REPORT_TASK, "checkpoint": checkpoint, **results},
        indent=2,
        default=handle_non_serializable,
        ensure_ascii=False,
    )


def tables(results: dict) -> str:
    """lm-eval's own tables: per task, then per group when the tasks form groups."""
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_report(output: OutputTarget, results: dict, checkpoint: str) -> None:
    print(tables(results))
    written = write_output_file(output, HARNESS_REPORT, report(results, checkpoint) + "\n")
    print(f"wrote {written}")
