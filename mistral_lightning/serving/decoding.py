"""The model side of the server: a batch of requests in, one piece of text per request per step out.

Greedy requests decode together as one batch (a greedy continuation does not depend on its batch
mates); a sampled request decodes on its own, so its `seed` gives the same text as `generate --seed`
whatever else is being served. Each request stops at its own EOS, stop string or max_tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mistral_lightning.generation.decoding import stream_generate
from mistral_lightning.generation.text_stream import StopTextStream
from mistral_lightning.model import Mistral
from mistral_lightning.serving.requests import DecodingRequest
from mistral_lightning.tokenizer import Tokenizer

STOP = "stop"  # OpenAI's finish reasons
LENGTH = "length"


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
) -> Iterator[list[dict | None]]:
    """Per step, each request's piece {text, finish_reason, completion_tokens}, or None when it has none."""
    streams = [StopTextStream(tokenizer, request.stop) for request in requests]
    for group in decoding_groups(requests):
        running = set(group)
        first = requests[group[0]]
        steps = stream_generate(
            model,
            [requests[index].prompt_ids for index in group],
            max(requests[index].max_tokens for index in group),
            temperature=first.temperature,
            top_p=first.top_p,
            eos_id=tokenizer.eos_id,
            generator=_generator(model, first),
            prefill_chunk_size=prefill_chunk_size,
        )
        for step in steps:
            pieces: list[dict | None] = [None] * len(requests)
            for index, token in zip(group, step):
                if index not in running or token is None:
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
            yield pieces
            if not running:
                break
        steps.close()
        if running:  # the context filled up first (max_tokens is checked against it, so this is a safeguard)
            yield [
                _piece(streams[i].finish(), LENGTH, streams[i]) if i in running else None
                for i in range(len(requests))
            ]
