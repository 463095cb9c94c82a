"""`mistral-lightning preprocess`: tokenize parquet/jsonl/json rows into Megatron indexed datasets.

The main process reads rows in bounded chunks (pyarrow record batches for parquet) and hands them to
`--workers` processes; results are written in input order, so the output bytes never depend on N.
"""

from __future__ import annotations

import abc
import argparse
import glob
import itertools
import json
import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mistral_lightning.data.indexed import LABEL_DTYPE, IndexedDatasetWriter, bin_path, idx_path, token_dtype
from mistral_lightning.errors import UserError
from mistral_lightning.prompts import TemplateError, encode_alpaca, encode_mistral_chat
from mistral_lightning.tokenizer import Tokenizer, TokenizerError

HANDLERS = ("GeneralPretrainHandler", "GeneralInstructionHandler", "MistralInstructionHandler")
INSTRUCTION_KEYS = ("input_ids", "attention_mask", "labels")
SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json"}
CHUNK_ROWS = 1000
SKIP_EXAMPLES = 5


class PreprocessError(UserError):
    """Bad input or options; the message says what to fix."""


@dataclass
class PreprocessConfig:
    input: str
    tokenizer_model: str
    output_prefix: str
    handler_name: str = "GeneralPretrainHandler"
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    seq_length: int | None = None
    overlong: str = "skip"
    workers: int = 1
    log_interval: int = 100


@dataclass
class EncodedChunk:
    """One chunk's documents per output key (flat tokens + lengths), and what was dropped or cut."""

    flat: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    token_count: int = 0  # tokens of text (not of masks or labels) in the documents
    skipped: list[tuple[int, RowSkip]] = field(default_factory=list)  # (row within chunk, why)
    truncated: int = 0


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


# ---------------------------------------------------------------- handlers (run inside workers)


class RowSkip(Exception):
    """A row that is counted and left out: `kind` groups it in the summary, `detail` locates the problem."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


def _as_text(value: object, column: str) -> str:
    """The cell as a string, or raise RowSkip saying why it cannot be used."""
    if value is None:
        raise RowSkip("null or missing field", column)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowSkip("non-UTF-8 bytes", column) from None
    if not isinstance(value, str):
        raise RowSkip("non-text field", f"{column} is {type(value).__name__}")
    return value


class Handler(abc.ABC):
    """Turns rows into token sequences for each output key; `encode_rows` never raises on bad rows."""

    output_keys: tuple[str, ...] = INSTRUCTION_KEYS
    token_keys: tuple[str, ...] = ("input_ids",)

    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.dtypes = {
            "input_ids": token_dtype(tokenizer.vocab_size),
            "attention_mask": np.uint8,
            "labels": LABEL_DTYPE,
        }

    def required_columns(self, columns: set[str]) -> list[str]:
        """Columns this handler needs that are absent from `columns`."""
        return [name for name in ("instruction", "output") if name not in columns]

    @abc.abstractmethod
    def encode_row(self, row: dict) -> dict[str, list[int]]:
        """The named token lists (input_ids, labels, ...) one row becomes."""

    def encode_rows(self, rows: list[dict | RowSkip]) -> EncodedChunk:
        samples: list[dict[str, list[int]]] = []
        chunk = EncodedChunk({}, {})
        for index, row in enumerate(rows):
            try:
                if isinstance(row, RowSkip):  # the reader already found this row unusable
                    raise row
                samples.append(self._fit_length(self.encode_row(row), chunk))
            except RowSkip as skip:
                chunk.skipped.append((index, skip))
        for key in self.output_keys:
            sequences = [sample[key] for sample in samples]
            lengths = np.array([len(s) for s in sequences], dtype=np.int64)
            flat = np.fromiter(
                itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum())
            )
            chunk.lengths[key], chunk.flat[key] = lengths, flat.astype(self.dtypes[key])
        chunk.token_count = sum(int(chunk.lengths[key].sum()) for key in self.token_keys)
        return chunk

    def _fit_length(self, sample: dict[str, list[int]], chunk: EncodedChunk) -> dict[str, list[int]]:
        limit = self.config.seq_length
        longest = max(len(ids) for ids in sample.values())
        if limit is None or longest <= limit:
            return sample
        if self.config.overlong == "skip":
            raise RowSkip("longer than --seq-length", f"{longest} > {limit} tokens")
        chunk.truncated += 1
        return {key: ids[:limit] for key, ids in sample.items()}


class PretrainHandler(Handler):
    def __init__(self, tokenizer: Tokenizer, config: PreprocessConfig) -> None:
        super().__init__(tokenizer, config)
        self.output_keys = self.token_keys = config.json_keys
        self.dtypes = dict.fromkeys(config.json_keys, token_dtype(tokenizer.vocab_size))

    def required_columns(self, columns: set[str]) -> list[str]:
        return [key for key in self.config.json_keys if key not in columns]

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        sample = {}
        for key in self.config.json_keys:
            text = _as_text(row.get(key), key)
            if not text:
                raise RowSkip("empty text", key)
            sample[key] = self.tokenizer.encode(text, bos=True, eos=self.config.append_eod)
        return sample


class AlpacaHandler(Handler):
    def encode_row(self, row: dict) -> dict[str, list[int]]:
        instruction = _as_text(row.get("instruction"), "instruction")
        # A missing or null input is the common "no input" case in Alpaca data, not an error.
        input_text = "" if row.get("input") is None else _as_text(row.get("input"), "input")
        output = _as_text(row.get("output"), "output")
        sample = encode_alpaca(self.tokenizer, instruction, input_text, output, self.config.append_eod)
        return {
            "input_ids": sample.input_ids,
            "attention_mask": [1] * len(sample.input_ids),
            "labels": sample.labels,
        }


class MistralHandler(Handler):
    def required_columns(self, columns: set[str]) -> list[str]:
        return [] if "messages" in columns else super().required_columns(columns)

    def encode_row(self, row: dict) -> dict[str, list[int]]:
        messages = row.get("messages")
        if messages is None:
            instruction = _as_text(row.get("instruction"), "instruction")
            extra = "" if row.get("input") is None else _as_text(row.get("input"), "input")
            user = f"{instruction}\n{extra}" if extra else instruction
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _as_text(row.get("output"), "output")},
            ]
        elif not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RowSkip("invalid conversation", "'messages' is not a list of {role, content} objects")
        try:
            sample = encode_mistral_chat(self.tokenizer, messages)
        except TemplateError as error:
            raise RowSkip("invalid conversation", str(error)) from None
        # The template already ends every answer with </s>, so --append-eod adds nothing here.
        return {
            "input_ids": sample.input_ids,
            "attention_mask": [1] * len(sample.input_ids),
            "labels": sample.labels,
        }


HANDLER_CLASSES = {
    "GeneralPretrainHandler": PretrainHandler,
    "GeneralInstructionHandler": AlpacaHandler,
    "MistralInstructionHandler": MistralHandler,
}

_worker_handler: Handler | None = None


def _init_worker(config: PreprocessConfig) -> None:
    global _worker_handler
    _worker_handler = HANDLER_CLASSES[config.handler_name](Tokenizer(config.tokenizer_model), config)


def _encode_in_worker(rows: list[dict | RowSkip]) -> EncodedChunk:
    return _worker_handler.encode_rows(rows)


# ---------------------------------------------------------------- input reading (main process)


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


def _missing_column_error(path: Path, missing: list[str], columns: set[str]) -> PreprocessError:
    return PreprocessError(
        f"{path}: missing column {', '.join(repr(c) for c in missing)}; columns found: "
        f"{', '.join(sorted(columns)) or 'none'}. Rename the column or choose --json-keys/--handler-name"
    )


def _read_parquet(path: Path, handler: Handler) -> Iterator[list[dict | RowSkip]]:
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


def _parse_json_line(line: bytes) -> dict | RowSkip:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return RowSkip("non-UTF-8 bytes", f"byte {error.start}")
    except json.JSONDecodeError as error:
        return RowSkip("invalid JSON", error.msg)
    return row if isinstance(row, dict) else NOT_AN_OBJECT


def _read_json_lines(path: Path, handler: Handler) -> Iterator[list[dict | RowSkip]]:
    chunk: list[dict | RowSkip] = []
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


def _read_json(path: Path, handler: Handler) -> Iterator[list[dict | RowSkip]]:
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


NOT_AN_OBJECT = RowSkip("invalid JSON", "the row is not an object")
READERS = {"parquet": _read_parquet, "jsonl": _read_json_lines, "json": _read_json}


# ---------------------------------------------------------------- driver


def output_prefixes(config: PreprocessConfig) -> dict[str, str]:
    """Output dataset prefix per key, named as ModelLink/Megatron name them."""
    if config.handler_name == "GeneralPretrainHandler":
        return {key: f"{config.output_prefix}_{key}_document" for key in config.json_keys}
    return {key: f"{config.output_prefix}_packed_{key}_document" for key in INSTRUCTION_KEYS}


class _Progress:
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


def _total_rows(files: list[Path]) -> int | None:
    """Known up front only when every input is parquet (its footer stores the row count)."""
    if any(p.suffix != ".parquet" for p in files):
        return None
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    except Exception:  # unreadable files are reported properly when they are read
        return None


def _encoded_chunks(
    chunks: Iterator[list[dict | RowSkip]], config: PreprocessConfig, handler: Handler
) -> Iterator[EncodedChunk]:
    """Encode chunks in order; with workers, keep at most 2 chunks per worker in flight to bound memory."""
    if config.workers == 1:
        for chunk in chunks:
            yield handler.encode_rows(chunk)
        return
    # fork shares the already-imported modules; spawn (other platforms) re-imports them in each worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * config.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize `config.input` into the indexed datasets named by `output_prefixes(config)`."""
    if config.handler_name not in HANDLER_CLASSES:
        raise PreprocessError(
            f"--handler-name {config.handler_name!r} is unknown; choose one of {', '.join(HANDLERS)}"
        )
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    if config.seq_length is not None and config.seq_length < 2:
        raise PreprocessError(f"--seq-length must be at least 2, got {config.seq_length}")
    try:
        tokenizer = Tokenizer(config.tokenizer_model)
    except TokenizerError as error:
        raise PreprocessError(f"--tokenizer-model: {error}") from error
    handler = HANDLER_CLASSES[config.handler_name](tokenizer, config)
    files = expand_inputs(config.input)
    summary = PreprocessSummary(files=len(files))
    progress = _Progress(config.log_interval, _total_rows(files))
    origins: deque[tuple[Path, int]] = deque()  # (file, first row number) of each chunk read, in order

    def chunks() -> Iterator[list[dict | RowSkip]]:
        for path in files:
            row_number = 1
            for chunk in READERS[SUFFIXES[path.suffix]](path, handler):
                origins.append((path, row_number))
                row_number += len(chunk)
                yield chunk
            if row_number == 1:
                summary.empty_files.append(str(path))

    prefixes = output_prefixes(config)
    Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    writers = {key: IndexedDatasetWriter(prefix, handler.dtypes[key]) for key, prefix in prefixes.items()}
    try:
        for encoded in _encoded_chunks(chunks(), config, handler):
            path, first_row = origins.popleft()
            _record(summary, encoded, path, first_row)
            for key, writer in writers.items():
                writer.add_documents(encoded.flat[key], encoded.lengths[key])
            progress.update(summary)
        if summary.documents == 0:
            raise PreprocessError(_nothing_written_message(config, summary))
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    summary.seconds = time.perf_counter() - start
    progress.update(summary, final=True)
    summary.outputs = [str(p) for prefix in prefixes.values() for p in (bin_path(prefix), idx_path(prefix))]
    return summary


def _record(summary: PreprocessSummary, encoded: EncodedChunk, path: Path, first_row: int) -> None:
    documents = len(next(iter(encoded.lengths.values())))
    summary.rows += documents + len(encoded.skipped)
    summary.documents += documents
    summary.tokens += encoded.token_count
    summary.truncated += encoded.truncated
    for index, skip in encoded.skipped:
        summary.skipped[skip.kind] = summary.skipped.get(skip.kind, 0) + 1
        if len(summary.skip_examples) < SKIP_EXAMPLES:
            summary.skip_examples.append(f"{path} row {first_row + index}: {skip}")


def _nothing_written_message(config: PreprocessConfig, summary: PreprocessSummary) -> str:
    if summary.rows == 0:
        return f"--input {config.input} holds no rows (empty files: {', '.join(summary.empty_files)}); nothing written"
    details = "; ".join(summary.skip_examples)
    return f"all {summary.rows} rows of --input {config.input} were skipped ({details}); nothing written"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning preprocess",
        description="Tokenize parquet/jsonl/json data into Megatron indexed datasets (.bin/.idx).",
    )
    parser.add_argument(
        "--input", required=True, help="a .parquet/.jsonl/.json file, a folder of them, or a glob"
    )
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument(
        "--tokenizer-model", help="sentencepiece .model file, or an HF folder with tokenizer.model"
    )
    tokenizer.add_argument(
        "--tokenizer-name-or-path", dest="tokenizer_model", help="same as --tokenizer-model"
    )
    parser.add_argument(
        "--tokenizer-type",
        choices=("PretrainedFromHF", "SentencePieceTokenizer"),
        default="PretrainedFromHF",
        help="accepted for recipe compatibility; both read tokenizer.model",
    )
    parser.add_argument(
        "--tokenizer-not-use-fast",
        action="store_true",
        help="accepted for recipe compatibility; sentencepiece is the slow HF tokenizer already",
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="writes <prefix>_<key>_document (pretrain) or <prefix>_packed_{input_ids,"
        "attention_mask,labels}_document (instruction) .bin/.idx",
    )
    parser.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="text columns for GeneralPretrainHandler, one dataset each (default: text)",
    )
    parser.add_argument(
        "--handler-name",
        choices=HANDLERS,
        default="GeneralPretrainHandler",
        help="GeneralPretrainHandler: plain text; GeneralInstructionHandler: Alpaca template over "
        "instruction/input/output; MistralInstructionHandler: [INST] template over a 'messages' "
        "column (list of {role, content}) or instruction/input/output",
    )
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="append EOS to every document/sample (the Mistral template always ends answers with EOS)",
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="rows whose token count exceeds this are handled per --overlong and counted in the "
        "summary (default: no limit; pretraining packing cuts documents anyway)",
    )
    parser.add_argument(
        "--overlong",
        choices=("skip", "truncate"),
        default="skip",
        help="skip (default) drops rows longer than --seq-length; truncate keeps their first "
        "--seq-length tokens",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes; the output is byte-identical for any value",
    )
    parser.add_argument("--log-interval", type=int, default=100, help="rows between progress reports")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        input=args.input,
        tokenizer_model=args.tokenizer_model,
        output_prefix=args.output_prefix,
        handler_name=args.handler_name,
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        seq_length=args.seq_length,
        overlong=args.overlong,
        workers=args.workers,
        log_interval=args.log_interval,
    )
    print(format_summary(preprocess(config)))
    return 0
