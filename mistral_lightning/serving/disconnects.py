"""Which clients went away: the HTTP process reports a request whose client disconnected, and the model
worker stops decoding it at its next step (LitServe itself keeps decoding for a client that has left)."""

from __future__ import annotations

import multiprocessing
import queue


class Disconnects:
    """Request ids whose client disconnected, from the HTTP process to the model worker.

    Made before the server starts: LitServe forks the HTTP process and spawns the worker with this object
    among their arguments, which is how a multiprocessing queue reaches another process.
    """

    def __init__(self) -> None:
        self._queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
        self._gone: set[str] = set()  # in the worker: reported and not yet dropped

    def report(self, request_id: str) -> None:
        """The HTTP side: this request's client is gone."""
        self._queue.put_nowait(request_id)

    def gone(self) -> set[str]:
        """The worker side: the ids reported so far; `drop` each once its decoding has stopped."""
        while True:
            try:
                self._gone.add(self._queue.get_nowait())
            except queue.Empty:
                return self._gone

    def drop(self, request_id: str) -> None:
        self._gone.discard(request_id)
