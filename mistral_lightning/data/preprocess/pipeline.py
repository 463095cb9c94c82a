"""preprocess(): read chunks, encode them in `--workers` processes, write the documents in input order.

Results are taken in submission order, so the output bytes never depend on the worker count; each
encoded chunk brings its own origin back for the summary. A worker that dies (the out-of-memory killer,
a crash in the tokenizer) ends the run with the chunk it was encoding instead of a hang.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from pathlib import Path

from mistral_lightning.data.indexed import MAGIC, IndexedDatasetWriter, bin_path, idx_path
from mistral_lightning.data.preprocess.chunks import EncodedChunk, RowChunk
from mistral_lightning.data.preprocess.config import PreprocessConfig, PreprocessError
from mistral_lightning.data.preprocess.formats import AUTO, resolve_format
from mistral_lightning.data.preprocess.handlers import HANDLER_CLASSES, Handler, create_handler
from mistral_lightning.data.preprocess.progress import Progress
from mistral_lightning.data.preprocess.readers import expand_inputs, read_chunks, total_rows
from mistral_lightning.data.preprocess.summary import PreprocessSummary
from mistral_lightning.outputs import OutputTarget, probe_writable, remove_leftovers, write_errors

_worker_handler: Handler | None = None


def _init_worker(config: PreprocessConfig) -> None:
    global _worker_handler
    # Ctrl-C reaches the whole process group; the main process alone stops the run, workers just finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    _worker_handler = create_handler(config)


def _exit_with_parent() -> None:
    """A worker whose main process was killed exits instead of waiting for work forever."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)


def _encode_in_worker(chunk: RowChunk) -> EncodedChunk:
    return _worker_handler.encode(chunk)


def _worker_pool(workers: int, context: BaseContext, config: PreprocessConfig) -> ProcessPoolExecutor:
    # Unlike multiprocessing.Pool, which waits forever for a killed worker, this fails its futures.
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(config,))


def encode_in_order(
    chunks: Iterator[RowChunk], config: PreprocessConfig, handler: Handler
) -> Iterator[EncodedChunk]:
    """Encode chunks in order; with workers, keep at most 2 chunks per worker in flight to bound memory."""
    if config.workers == 1:
        for chunk in chunks:
            yield handler.encode(chunk)
        return
    # fork shares the already-imported modules; spawn (other platforms) re-imports them in each worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pool = _worker_pool(config.workers, context, config)
    in_flight: deque[tuple[RowChunk, Future]] = deque()
    try:
        for chunk in chunks:
            in_flight.append((chunk, pool.submit(_encode_in_worker, chunk)))
            if len(in_flight) >= 2 * config.workers:
                yield _take_oldest(in_flight)
        while in_flight:
            yield _take_oldest(in_flight)
    except BrokenProcessPool:
        unfinished = [c for c, f in in_flight if isinstance(f.exception(), BrokenProcessPool)]
        raise _worker_died(unfinished, context, config) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _take_oldest(in_flight: deque[tuple[RowChunk, Future]]) -> EncodedChunk:
    """The oldest chunk's result; the chunk stays in flight until it has one, so a dead worker can name it."""
    encoded = in_flight[0][1].result()
    in_flight.popleft()
    return encoded


def _worker_died(
    unfinished: list[RowChunk], context: BaseContext, config: PreprocessConfig
) -> PreprocessError:
    """Which chunk killed the worker: each unfinished chunk is encoded alone again; the first that kills
    its worker again is to blame. If none does, the worker was killed from outside, most likely for memory."""
    with _worker_pool(1, context, config) as retry:
        for chunk in unfinished:
            try:
                retry.submit(_encode_in_worker, chunk).result()
            except BrokenProcessPool:
                return PreprocessError(
                    f"a preprocess worker was killed while encoding {_rows(chunk)}, and again when that chunk "
                    "was encoded alone: a row there kills the tokenizer process (out of memory on a huge row, "
                    "or a crash); remove or shorten it and re-run (fewer --workers will not help)"
                )
    return PreprocessError(
        f"a preprocess worker was killed (by a signal, most likely the out-of-memory killer) while encoding "
        f"one of: {'; '.join(_rows(chunk) for chunk in unfinished)}; these encode fine alone, so re-run "
        f"with fewer --workers (now {config.workers}) or more memory"
    )


def _rows(chunk: RowChunk) -> str:
    """`file rows first-last` of a chunk."""
    first = chunk.origin.first_row
    return f"{chunk.origin.path} rows {first}-{first + len(chunk.rows) - 1}"


def _check_options(config: PreprocessConfig) -> None:
    if config.handler_name not in (*HANDLER_CLASSES, AUTO):
        raise PreprocessError(
            f"--handler-name {config.handler_name!r} is unknown; choose one of {', '.join(HANDLER_CLASSES)}"
        )
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    if config.seq_length is not None and config.seq_length < 2:
        raise PreprocessError(f"--seq-length must be at least 2, got {config.seq_length}")


def _read_all(files: list[Path], handler: Handler, summary: PreprocessSummary) -> Iterator[RowChunk]:
    """Every file's chunks in turn; a file that yields none is noted as empty."""
    for path in files:
        empty = True
        for chunk in read_chunks(path, handler):
            empty = False
            yield chunk
        if empty:
            summary.empty_files.append(str(path))


def _check_outputs(config: PreprocessConfig, prefixes: dict[str, str]) -> OutputTarget:
    """A rerun replaces the indexed datasets it wrote before; any other file under an output name is
    refused, before any work. Temporaries of crashed runs there are removed."""
    target = OutputTarget(Path(config.output_prefix), option="--output-prefix")
    for prefix in prefixes.values():
        index, data = idx_path(prefix), bin_path(prefix)
        for path in (data, index):
            remove_leftovers(path.parent, path.name)
        previous = False
        if index.is_file():
            with write_errors(index, target), index.open("rb") as stream:
                previous = stream.read(len(MAGIC)) == MAGIC
        for path in (data, index):
            if path.is_symlink() or (path.exists() and not (previous and path.is_file())):
                if path.is_file() and path.stat().st_size == 0:
                    continue  # nothing to lose
                raise PreprocessError(
                    f"{target.named()}: {path} exists and is not part of an indexed dataset written by "
                    "preprocess; refusing to replace it; choose another --output-prefix or move it away"
                )
    probe_writable(target.path.parent, target)
    return target


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize `config.input` into the indexed datasets the handler's `dataset_prefixes()` names."""
    _check_options(config)
    files = expand_inputs(config.input, config.split)
    config, data_format = resolve_format(config, files)  # workers get the resolved config too
    handler = create_handler(config)
    summary = PreprocessSummary(files=len(files), format=data_format)
    progress = Progress(config.log_interval, total_rows(files))
    prefixes = handler.dataset_prefixes()
    target = _check_outputs(config, prefixes)
    start = time.perf_counter()
    with write_errors(target.path, target):
        writers = {key: IndexedDatasetWriter(prefix, handler.dtypes[key]) for key, prefix in prefixes.items()}
    try:
        for encoded in encode_in_order(_read_all(files, handler, summary), config, handler):
            summary.add(encoded)
            for key, writer in writers.items():
                with write_errors(bin_path(prefixes[key]), target):
                    writer.add_documents(encoded.flat[key], encoded.lengths[key])
            progress.update(summary)
        if summary.documents == 0:
            raise PreprocessError(summary.nothing_written_message(config.input))
        for key, writer in writers.items():
            with write_errors(idx_path(prefixes[key]), target):
                writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    summary.seconds = time.perf_counter() - start
    progress.update(summary, final=True)
    summary.outputs = [str(p) for prefix in prefixes.values() for p in (bin_path(prefix), idx_path(prefix))]
    return summary
