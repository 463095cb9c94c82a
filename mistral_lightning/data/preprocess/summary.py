"""What a preprocessing run did: counts, a few located skip examples, and the report printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mistral_lightning.data.preprocess.chunks import EncodedChunk
from mistral_lightning.labels import IGNORE_INDEX

SKIP_EXAMPLES = 5


@dataclass
class PreprocessSummary:
    files: int = 0
    format: str = ""  # the format read, and whether --handler auto chose it
    empty_files: list[str] = field(default_factory=list)
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: list[str] = field(default_factory=list)
    truncated: int = 0
    unlabelled: int | None = None  # samples without a labelled token; None when the data has no labels
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def add(self, encoded: EncodedChunk) -> None:
        """Count one encoded chunk; its skipped rows are named by the chunk's own origin."""
        self.rows += encoded.documents + len(encoded.skipped)
        self.documents += encoded.documents
        self.tokens += encoded.token_count
        self.truncated += encoded.truncated
        if "labels" in encoded.flat:
            self.unlabelled = (self.unlabelled or 0) + _unlabelled(encoded)
        for index, skip in encoded.skipped:
            self.skipped[skip.kind] = self.skipped.get(skip.kind, 0) + 1
            if len(self.skip_examples) < SKIP_EXAMPLES:
                self.skip_examples.append(f"{encoded.origin.row(index)}: {skip}")

    def nothing_written_message(self, input_spec: str) -> str:
        if self.rows == 0:
            return f"--input {input_spec} holds no rows (empty files: {', '.join(self.empty_files)}); nothing written"
        details = "; ".join(self.skip_examples)
        return f"all {self.rows} rows of --input {input_spec} were skipped ({details}); nothing written"


def _unlabelled(encoded: EncodedChunk) -> int:
    """How many of the chunk's samples have no label other than IGNORE_INDEX: they teach nothing."""
    labelled_so_far = np.concatenate(([0], np.cumsum(encoded.flat["labels"] != IGNORE_INDEX)))
    ends = np.concatenate(([0], np.cumsum(encoded.lengths["labels"])))
    return int((np.diff(labelled_so_far[ends]) == 0).sum())


def _unlabelled_warning(summary: PreprocessSummary) -> list[str]:
    if not summary.unlabelled:
        return []
    which = (
        f"none of the {summary.documents} samples has"
        if summary.unlabelled == summary.documents
        else f"{summary.unlabelled} of the {summary.documents} samples have"
    )
    return [
        f"  warning: {which} a labelled token (the prompt fills them), so training learns nothing from them; "
        "raise --seq-length, or keep the default --overlong skip so that such rows are dropped, not truncated"
    ]


def format_summary(summary: PreprocessSummary) -> str:
    skipped = sum(summary.skipped.values())
    reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(summary.skipped.items()))
    rate = max(summary.seconds, 1e-9)
    lines = [
        "preprocess summary",
        f"  input files:       {summary.files} (empty: {len(summary.empty_files)})",
        *([f"  format:            {summary.format}"] if summary.format else []),
        f"  rows read:         {summary.rows}",
        f"  documents written: {summary.documents}",
        f"  tokens written:    {summary.tokens}",
        f"  skipped rows:      {skipped}" + (f" ({reasons})" if reasons else ""),
        *(f"    e.g. {example}" for example in summary.skip_examples),
        f"  truncated rows:    {summary.truncated}",
        *(
            [f"  samples without a labelled token: {summary.unlabelled} of {summary.documents}"]
            if summary.unlabelled is not None
            else []
        ),
        f"  time:              {summary.seconds:.1f} s ({summary.documents / rate:,.0f} docs/s, "
        f"{summary.tokens / rate:,.0f} tokens/s)",
        *(f"  wrote {path}" for path in summary.outputs),
    ]
    lines += [f"  warning: empty input file {path}" for path in summary.empty_files]
    lines += _unlabelled_warning(summary)
    return "\n".join(lines)
