"""`--columns TARGET=SOURCE,...`: the names a format reads, mapped onto the names a dataset uses."""

from __future__ import annotations

from collections.abc import Iterable

from mistral_lightning.data.preprocess.config import PreprocessError


def parse_columns(spec: str | None) -> tuple[tuple[str, str], ...]:
    """`instruction=question,output=answer` as ((target, source), ...); one line on a malformed pair."""
    if not spec:
        return ()
    pairs: dict[str, str] = {}
    for item in spec.split(","):
        target, equals, source = (part.strip() for part in item.partition("="))
        if not (equals and target and source):
            raise PreprocessError(
                f"--columns {item}: write TARGET=SOURCE pairs separated by commas, e.g. "
                "--columns instruction=question,output=answer"
            )
        if target in pairs:
            raise PreprocessError(f"--columns {item}: '{target}' is mapped twice; map it once")
        pairs[target] = source
    return tuple(pairs.items())


class ColumnMapping:
    """Renames a dataset's columns (and ShareGPT's turn fields) to the names a format reads."""

    def __init__(self, pairs: Iterable[tuple[str, str]], format_label: str, names: Iterable[str]) -> None:
        self.sources = dict(pairs)
        names = tuple(names)
        for target, source in self.sources.items():
            if target not in names:
                raise PreprocessError(
                    f"--columns {target}={source}: '{target}' is not a column of {format_label}; map one of "
                    f"{', '.join(names)} (TARGET=SOURCE: the format's name = your column's name)"
                )
        self.targets = {source: target for target, source in self.sources.items()}

    def source(self, target: str) -> str:
        """The dataset's name for the format's `target`."""
        return self.sources.get(target, target)

    def rename(self, row: dict) -> dict:
        """The row with mapped columns under the format's names (they win over a column already so named)."""
        if not self.sources:
            return row
        renamed = {k: v for k, v in row.items() if k not in self.sources and k not in self.targets}
        renamed.update((self.targets[key], value) for key, value in row.items() if key in self.targets)
        return renamed

    def rename_columns(self, columns: Iterable[str]) -> set[str]:
        return set(self.rename(dict.fromkeys(columns)))
