"""Input files: expand --input into files, and read each in chunks of rows that carry their origin.

Readers run in the main process and check a file's columns against the handler before any row is
encoded; a row that cannot be parsed travels on as a RowSkip so that the handler counts it.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

from mistral_lightning.data.preprocess.chunks import CHUNK_ROWS, ChunkOrigin, Row, RowChunk, RowSkip
from mistral_lightning.data.preprocess.config import PreprocessError
from mistral_lightning.data.preprocess.handlers import Handler

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json"}
NOT_AN_OBJECT = RowSkip("invalid JSON", "the row is not an object")
WHITESPACE = re.compile(r"[ \t\n\r]*")
# A string literal (escapes included) or one structural character: enough to find an array's elements.
JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


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
    import pyarrow as pa
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
    batches, rows_read = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=sorted(wanted)), 0
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as error:  # a corrupt page fails only when it is decoded
            raise PreprocessError(
                f"{path}: cannot read the rows after row {rows_read} ({error}); the file is corrupt, "
                "re-export it or leave it out of --input"
            ) from error
        if batch is None:
            return
        rows_read += batch.num_rows
        yield batch.to_pylist()


def _unparseable(error: RecursionError | ValueError) -> RowSkip:
    """Valid JSON that Python's parser refuses: too deep a nesting, or an integer beyond its digit limit."""
    if isinstance(error, RecursionError):
        return RowSkip("unparseable JSON", "nested deeper than Python's JSON parser allows")
    return RowSkip("unparseable JSON", str(error).split(";")[0])


def _parse_json_line(line: bytes) -> Row:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return RowSkip("non-UTF-8 bytes", f"byte {error.start}")
    except json.JSONDecodeError as error:
        return RowSkip("invalid JSON", error.msg)
    except (RecursionError, ValueError) as error:
        return _unparseable(error)
    return row if isinstance(row, dict) else NOT_AN_OBJECT


def _json_value_end(text: str, start: int) -> int:
    """Where the JSON value at `start` ends, found by matching brackets outside strings (no recursion)."""
    depth = 0
    for token in JSON_TOKEN.finditer(text, start):
        mark = token.group()
        if mark[0] == '"':
            continue
        if mark in "[{":
            depth += 1
        elif depth == 0:  # the "," or "]" after a bare value
            return token.start()
        elif mark in "]}":
            depth -= 1
            if depth == 0:
                return token.end()
    return len(text)


def _json_array_rows(path: Path, text: str) -> list[Row]:
    """The elements of the JSON array `text` parsed one at a time, so that one Python's parser cannot
    handle (nested too deeply, an integer too long) is skipped alone instead of failing the file."""
    decoder, rows = json.JSONDecoder(), []
    position = WHITESPACE.match(text, text.index("[") + 1).end()
    while not text.startswith("]", position):
        try:
            value, position = decoder.raw_decode(text, position)
            rows.append(value if isinstance(value, dict) else NOT_AN_OBJECT)
        except json.JSONDecodeError as error:
            raise PreprocessError(f"{path} is not valid JSON: {error}") from error
        except (RecursionError, ValueError) as error:
            rows.append(_unparseable(error))
            position = _json_value_end(text, position)
        position = WHITESPACE.match(text, position).end()
        if text.startswith(",", position):
            position = WHITESPACE.match(text, position + 1).end()
            if text.startswith("]", position):
                _json_syntax_error(path, text, position, "a value after ','")
        elif not text.startswith("]", position):
            _json_syntax_error(path, text, position, "',' or ']'")
    if text[position + 1 :].strip():
        _json_syntax_error(path, text, position + 1, "nothing after the array")
    return rows


def _json_syntax_error(path: Path, text: str, position: int, expected: str) -> None:
    line = text.count("\n", 0, position) + 1
    raise PreprocessError(f"{path} is not valid JSON: expected {expected} at line {line}")


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
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise PreprocessError(f"{path} is not UTF-8 at byte {error.start}; re-export it as UTF-8") from error
    rows = _json_array_rows(path, text)
    first = next((row for row in rows if isinstance(row, dict)), None)
    if first is not None and handler.required_columns(set(first)):
        raise _missing_column_error(path, handler.required_columns(set(first)), set(first))
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start : start + CHUNK_ROWS]


READERS = {"parquet": _read_parquet, "jsonl": _read_json_lines, "json": _read_json}
