"""The model side of the server: a batch of requests in, one piece of text per request per step out.

Greedy requests decode together as one batch (a greedy continuation does not depend on its batch
mates); a sampled request decodes on its own, so its `seed` gives the same text as `generate --seed`
whatever else is being served. Each request stops at its own EOS, stop string or max_tokens, or when its
client disconnects, and leaves the batch then.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import closing

import torch

from mistral_lightning.generation.decoding import stream_generate
from mistral_lightning.generation.text_stream import StopTextStream
from mistral_lightning.model import Mistral
from mistral_lightning.serving.disconnects import Disconnects
from mistral_lightning.serving.requests import DecodingRequest
from mistral_lightning.tokenizer import Tokenizer

STOP = "stop"  # OpenAI's finish reasons
LENGTH = "length"
FAILED = {"error": "decoding failed"}  # the piece of a request whose decoding raised

log = logging.getLogger(__name__)


def decoding_groups(requests: list[DecodingRequest]) -> list[list[int]]:
    """Indices of the requests that decode together: all greedy ones, then each sampled one alone."""
    greedy = [index for index, request in enumerate(requests) if request.temperature == 0.0]
    sampled = [[index] for index, request in enumerate(requests) if request.temperature > 0.0]
    return ([greedy] if greedy else []) + sampled


def _generator(model: Mistral, request: DecodingRequest) -> torch.Generator | None:
    if request.temperature == 0.0:
        return None
    generator = torch.Generator(device=next(model.parameters()).device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed)
    return generator


def _piece(text: str, finish_reason: str | None, stream: StopTextStream) -> dict:
    return {"text": text, "finish_reason": finish_reason, "completion_tokens": len(stream.tokens)}


def decode_requests(
    model: Mistral,
    tokenizer: Tokenizer,
    requests: list[DecodingRequest],
    prefill_chunk_size: int | None = None,
    disconnects: Disconnects | None = None,
) -> Iterator[list[dict | None]]:
    """Per step, each request's piece {text, finish_reason, completion_tokens}, or None when it has none.

    A request whose client has disconnected gets no more pieces and its row stops decoding. A group whose
    decoding fails gives each of its unfinished requests the FAILED piece (the traceback is logged), and
    the other groups decode on.
    """
    streams = [StopTextStream(tokenizer, request.stop) for request in requests]
    for group in decoding_groups(requests):
        running = set(group) - _gone(requests, group, disconnects)
        try:
            if running:
                yield from _decode_group(
                    model, tokenizer, requests, group, running, streams, prefill_chunk_size, disconnects
                )
        except Exception:
            log.exception("decoding failed for the requests %s", [requests[i].request_id for i in running])
            yield [FAILED if index in running else None for index in range(len(requests))]
        finally:
            if disconnects is not None:
                for index in group:
                    disconnects.drop(requests[index].request_id)


def _decode_group(
    model: Mistral,
    tokenizer: Tokenizer,
    requests: list[DecodingRequest],
    group: list[int],
    running: set[int],
    streams: list[StopTextStream],
    prefill_chunk_size: int | None,
    disconnects: Disconnects | None,
) -> Iterator[list[dict | None]]:
    """The steps of one group; `running` loses each request as it ends."""
    first = requests[group[0]]
    steps = stream_generate(
        model,
        [requests[index].prompt_ids for index in group],
        [requests[index].max_tokens if index in running else 0 for index in group],
        temperature=first.temperature,
        top_p=first.top_p,
        eos_id=tokenizer.eos_id,
        generator=_generator(model, first),
        prefill_chunk_size=prefill_chunk_size,
    )
    with closing(steps):
        step = _send(steps, None)
        while step is not None:
            gone = _gone(requests, group, disconnects)
            pieces: list[dict | None] = [None] * len(requests)
            ended = []  # rows of the group whose tokens are no longer wanted
            for row, (index, token) in enumerate(zip(group, step)):
                if index not in running or token is None:
                    continue
                if index in gone:
                    running.discard(index)
                    ended.append(row)
                    continue
                stream = streams[index]
                text = stream.add(token)
                if stream.stopped or token == tokenizer.eos_id:
                    finish_reason = STOP
                elif len(stream.tokens) >= requests[index].max_tokens:
                    finish_reason = LENGTH
                else:
                    pieces[index] = _piece(text, None, stream)
                    continue
                pieces[index] = _piece(text + stream.finish(), finish_reason, stream)
                running.discard(index)
                ended.append(row)
            yield pieces
            if not running:
                return
            step = _send(steps, ended)
    # The context filled up first (max_tokens is checked against it, so this is a safeguard).
    yield [
        _piece(streams[i].finish(), LENGTH, streams[i]) if i in running else None
        for i in range(len(requests))
    ]


def _send(steps: Generator, ended: list[int] | None) -> list[int | None] | None:
    """The next step of `stream_generate`, after telling it which rows ended; None after the last."""
    try:
        return steps.send(ended)
    except StopIteration:
        return None


def _gone(requests: list[DecodingRequest], group: list[int], disconnects: Disconnects | None) -> set[int]:
    """The requests of the group whose client has disconnected."""
    if disconnects is None:
        return set()
    gone = disconnects.gone()
    return {index for index in group if requests[index].request_id in gone}
