"""The progress line on stderr: redrawn in place on a terminal, one line per report otherwise."""

from __future__ import annotations

import sys
import time

from mistral_lightning.data.preprocess.summary import PreprocessSummary


class Progress:
    """A one-line progress report every `interval` rows: a bar when the total is known, rates always."""

    def __init__(self, interval: int, total_rows: int | None) -> None:
        self.interval, self.total = max(1, interval), total_rows
        self.start = time.perf_counter()
        self.next_report = self.interval
        self.tty = sys.stderr.isatty()

    def update(self, summary: PreprocessSummary, final: bool = False) -> None:
        if summary.rows < self.next_report and not final:
            return
        self.next_report = (summary.rows // self.interval + 1) * self.interval
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        bar = ""
        if self.total:
            done = min(summary.rows / self.total, 1.0)
            bar = f"[{'#' * int(done * 30):<30}] {done:6.1%} "
        line = (
            f"{bar}{summary.rows} rows, {summary.documents} docs | {summary.documents / elapsed:,.0f} docs/s | "
            f"{summary.tokens / elapsed:,.0f} tokens/s"
        )
        end = "\n" if final or not self.tty else ""
        print(f"\r{line}" if self.tty else line, end=end, file=sys.stderr, flush=True)
