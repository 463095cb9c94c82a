"""Input files: expand --input into files, and read each in chunks of rows that carry their origin.

Readers run in the main process and check a file's columns against the handler before any row is
encoded; a row that cannot be parsed travels on as a RowSkip so that the handler counts it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from mistral_lightning.data.preprocess.chunks import CHUNK_ROWS, ChunkOrigin, Row, RowChunk, RowSkip
from mistral_lightning.data.preprocess.config import PreprocessError
from mistral_lightning.data.preprocess.handlers import Handler

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json"}
NOT_AN_OBJECT = RowSkip("invalid JSON", "the row is not an object")


def expand_inputs(spec: str) -> list[Path]:
    """One file, every supported file directly inside a folder, or a glob; sorted for a stable order."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        where = f"folder {path}"
    elif path.is_file():
        files = [path]
        where = f"file {path}"
    else:
        files = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        where = f"pattern {spec}"
    if not files:
        raise PreprocessError(
            f"--input {where} matches no file; give a .parquet, .jsonl or .json file, folder or glob"
        )
    unsupported = [str(p) for p in files if p.suffix not in SUFFIXES]
    if unsupported:
        raise PreprocessError(
            f"--input {unsupported[0]} has an unsupported extension; use one of {', '.join(SUFFIXES)}"
        )
    return files


def total_rows(files: list[Path]) -> int | None:
    """Known up front only when every input is parquet (its footer stores the row count)."""
    if any(p.suffix != ".parquet" for p in files):
        return None
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    except Exception:  # unreadable files are reported properly when they are read
        return None


def read_chunks(path: Path, handler: Handler) -> Iterator[RowChunk]:
    """The rows of `path` in chunks of at most CHUNK_ROWS, each with its file and first row number."""
    first_row = 1
    for rows in READERS[SUFFIXES[path.suffix]](path, handler):
        yield RowChunk(ChunkOrigin(path, first_row), rows)
        first_row += len(rows)


def _missing_column_error(path: Path, missing: list[str], columns: set[str]) -> PreprocessError:
    return PreprocessError(
        f"{path}: missing column {', '.join(repr(c) for c in missing)}; columns found: "
        f"{', '.join(sorted(columns)) or 'none'}. Rename the column or choose --json-keys/--handler-name"
    )


def _read_parquet(path: Path, handler: Handler) -> Iterator[list[Row]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise PreprocessError(f"cannot read parquet file {path}: {error}") from error
    columns = set(parquet.schema_arrow.names)
    missing = handler.required_columns(columns)
    if missing:
        raise _missing_column_error(path, missing, columns)
    wanted = {*handler.output_keys, "instruction", "input", "output", "messages"} & columns
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=sorted(wanted)):
        yield batch.to_pylist()


def _parse_json_line(line: bytes) -> Row:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return RowSkip("non-UTF-8 bytes", f"byte {error.start}")
    except json.JSONDecodeError as error:
        return RowSkip("invalid JSON", error.msg)
    return row if isinstance(row, dict) else NOT_AN_OBJECT


def _read_json_lines(path: Path, handler: Handler) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    checked = False
    with open(path, "rb") as stream:
        for line in stream:
            if not line.strip():
                continue
            row = _parse_json_line(line)
            if not checked and isinstance(row, dict):
                missing = handler.required_columns(set(row))
                if missing:
                    raise _missing_column_error(path, missing, set(row))
                checked = True
            chunk.append(row)
            if len(chunk) == CHUNK_ROWS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _read_json(path: Path, handler: Handler) -> Iterator[list[Row]]:
    """A .json file is either one array of objects or JSON lines (both occur in the wild)."""
    with open(path, "rb") as stream:
        head = stream.read(64).lstrip()
    if not head.startswith(b"["):
        yield from _read_json_lines(path, handler)
        return
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise PreprocessError(f"{path} is not UTF-8 at byte {error.start}; re-export it as UTF-8") from error
    except json.JSONDecodeError as error:
        raise PreprocessError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(rows, list):
        raise PreprocessError(
            f"{path} holds a JSON {type(rows).__name__}; expected an array of objects or JSON lines"
        )
    rows = [row if isinstance(row, dict) else NOT_AN_OBJECT for row in rows]
    first = next((row for row in rows if isinstance(row, dict)), None)
    if first is not None and handler.required_columns(set(first)):
        raise _missing_column_error(path, handler.required_columns(set(first)), set(first))
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start : start + CHUNK_ROWS]


READERS = {"parquet": _read_parquet, "jsonl": _read_json_lines, "json": _read_json}
