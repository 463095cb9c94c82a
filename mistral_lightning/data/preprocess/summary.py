"""What a preprocessing run did: counts, a few located skip examples, and the report printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from mistral_lightning.data.preprocess.chunks import EncodedChunk

SKIP_EXAMPLES = 5


@dataclass
class PreprocessSummary:
    files: int = 0
    empty_files: list[str] = field(default_factory=list)
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: list[str] = field(default_factory=list)
    truncated: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def add(self, encoded: EncodedChunk) -> None:
        """Count one encoded chunk; its skipped rows are named by the chunk's own origin."""
        self.rows += encoded.documents + len(encoded.skipped)
        self.documents += encoded.documents
        self.tokens += encoded.token_count
        self.truncated += encoded.truncated
        for index, skip in encoded.skipped:
            self.skipped[skip.kind] = self.skipped.get(skip.kind, 0) + 1
            if len(self.skip_examples) < SKIP_EXAMPLES:
                self.skip_examples.append(f"{encoded.origin.row(index)}: {skip}")

    def nothing_written_message(self, input_spec: str) -> str:
        if self.rows == 0:
            return f"--input {input_spec} holds no rows (empty files: {', '.join(self.empty_files)}); nothing written"
        details = "; ".join(self.skip_examples)
        return f"all {self.rows} rows of --input {input_spec} were skipped ({details}); nothing written"


def format_summary(summary: PreprocessSummary) -> str:
    skipped = sum(summary.skipped.values())
    reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(summary.skipped.items()))
    rate = max(summary.seconds, 1e-9)
    lines = [
        "preprocess summary",
        f"  input files:       {summary.files} (empty: {len(summary.empty_files)})",
        f"  rows read:         {summary.rows}",
        f"  documents written: {summary.documents}",
        f"  tokens written:    {summary.tokens}",
        f"  skipped rows:      {skipped}" + (f" ({reasons})" if reasons else ""),
        *(f"    e.g. {example}" for example in summary.skip_examples),
        f"  truncated rows:    {summary.truncated}",
        f"  time:              {summary.seconds:.1f} s ({summary.documents / rate:,.0f} docs/s, "
        f"{summary.tokens / rate:,.0f} tokens/s)",
        *(f"  wrote {path}" for path in summary.outputs),
    ]
    lines += [f"  warning: empty input file {path}" for path in summary.empty_files]
    return "\n".join(lines)
