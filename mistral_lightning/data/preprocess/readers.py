"""Input files: expand --input into files, and read each in chunks of rows that carry their origin.

Readers run in the main process and check a file's columns (after --columns renames them) against the
handler before any row is encoded; a row that cannot be parsed travels on as a RowSkip so that the
handler counts it. Arrow files (Hugging Face `datasets`) are read with pyarrow alone.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from mistral_lightning.data.preprocess.chunks import CHUNK_ROWS, ChunkOrigin, Row, RowChunk, RowSkip
from mistral_lightning.data.preprocess.config import PreprocessError
from mistral_lightning.data.preprocess.handlers import Handler
from mistral_lightning.data.preprocess.hf_datasets import dataset_files

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json", ".arrow": "arrow"}
NOT_AN_OBJECT = RowSkip("invalid JSON", "the row is not an object")
WHITESPACE = re.compile(r"[ \t\n\r]*")
# A string literal (escapes included) or one structural character: enough to find an array's elements.
JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


def expand_inputs(spec: str, split: str | None = None) -> list[Path]:
    """One split of a Hugging Face `datasets` folder, one file, every supported file directly inside a
    folder, or a glob; sorted for a stable order."""
    path = Path(spec)
    files = dataset_files(path, split) if path.is_dir() else None
    if files is not None:
        return files
    if split is not None:
        raise PreprocessError(
            f"--split {split}: --input {spec} is not a Hugging Face datasets folder (save_to_disk or a "
            "load_dataset cache); leave out --split"
        )
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
            f"--input {where} matches no file; give a .parquet, .jsonl, .json or .arrow file, a folder, a "
            "glob or a Hugging Face datasets folder"
        )
    unsupported = [str(p) for p in files if p.suffix not in SUFFIXES]
    if unsupported:
        raise PreprocessError(
            f"--input {unsupported[0]} has an unsupported extension; use one of {', '.join(SUFFIXES)}"
        )
    return files


def total_rows(files: list[Path]) -> int | None:
    """Known up front only when every input is parquet or arrow (their metadata store the row count)."""
    if any(SUFFIXES[p.suffix] not in ("parquet", "arrow") for p in files):
        return None
    try:
        return sum(
            _parquet_file(p).metadata.num_rows if p.suffix == ".parquet" else _arrow_table(p).num_rows
            for p in files
        )
    except PreprocessError:  # unreadable files are reported properly when they are read
        return None


def peek_columns(path: Path) -> list[str]:
    """The columns of `path`: its schema, or the keys of its first JSON object (none in an empty file)."""
    kind = SUFFIXES[path.suffix]
    if kind == "parquet":
        return _parquet_file(path).schema_arrow.names
    if kind == "arrow":
        return _arrow_table(path).column_names
    rows = (row for chunk in READERS[kind](path) for row in chunk)
    return list(next((row for row in rows if isinstance(row, dict)), {}))


def read_chunks(path: Path, handler: Handler) -> Iterator[RowChunk]:
    """The rows of `path` in chunks of at most CHUNK_ROWS, each with its file and first row number, and
    with the columns --columns maps under the format's names."""
    first_row, checked = 1, SUFFIXES[path.suffix] in SCHEMA_KINDS
    for rows in READERS[SUFFIXES[path.suffix]](path, handler):
        if not checked:  # JSON has no schema: its first object stands for the file
            first = next((row for row in rows if isinstance(row, dict)), None)
            if first is not None:
                check_columns(path, handler, first)
                checked = True
        rows = [handler.mapping.rename(row) if isinstance(row, dict) else row for row in rows]
        yield RowChunk(ChunkOrigin(path, first_row), rows)
        first_row += len(rows)


def check_columns(path: Path, handler: Handler, columns: Iterable[str]) -> None:
    """Refuse a file without the columns the handler needs, naming them as the dataset would."""
    columns = set(columns)
    missing = handler.required_columns(handler.mapping.rename_columns(columns))
    if missing:
        sources = [handler.mapping.source(name) for name in missing]
        raise PreprocessError(
            f"{path}: missing column {', '.join(repr(c) for c in sources)}; columns found: "
            f"{', '.join(sorted(columns)) or 'none'}; expected {handler.expected()}: map yours with "
            f"--columns {missing[0]}=YOUR_COLUMN, or choose the format with --handler (auto: by the columns)"
        )


def _wanted_columns(handler: Handler, columns: set[str]) -> list[str]:
    """The file's columns the handler reads (by their dataset names), so that no other is decoded."""
    return sorted({handler.mapping.source(name) for name in handler.columns} & columns)


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise PreprocessError(f"cannot read parquet file {path}: {error}") from error


def _arrow_table(path: Path):
    """An arrow IPC file as `datasets` writes them (stream format), or in the random-access file format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))  # the table's buffers keep the mapping open, no copy is made
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as error:
        raise PreprocessError(
            f"cannot read arrow file {path}: {error}; give an arrow IPC file written by pyarrow or datasets"
        ) from error


def _read_arrow(path: Path, handler: Handler) -> Iterator[list[Row]]:
    table = _arrow_table(path)
    check_columns(path, handler, table.column_names)
    table = table.select(_wanted_columns(handler, set(table.column_names)))
    for start in range(0, table.num_rows, CHUNK_ROWS):
        yield table.slice(start, CHUNK_ROWS).to_pylist()


def _read_parquet(path: Path, handler: Handler) -> Iterator[list[Row]]:
    import pyarrow as pa

    parquet = _parquet_file(path)
    columns = set(parquet.schema_arrow.names)
    check_columns(path, handler, columns)
    wanted = _wanted_columns(handler, columns)
    batches, rows_read = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=wanted), 0
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


def _read_json_lines(path: Path, handler: Handler | None = None) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    with open(path, "rb") as stream:
        for line in stream:
            if not line.strip():
                continue
            chunk.append(_parse_json_line(line))
            if len(chunk) == CHUNK_ROWS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _read_json(path: Path, handler: Handler | None = None) -> Iterator[list[Row]]:
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
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start : start + CHUNK_ROWS]


READERS = {"parquet": _read_parquet, "jsonl": _read_json_lines, "json": _read_json, "arrow": _read_arrow}
SCHEMA_KINDS = ("parquet", "arrow")  # their readers check the columns before reading a row
