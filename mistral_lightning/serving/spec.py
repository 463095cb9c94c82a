"""The HTTP side of the server: OpenAI's routes, checking each request before it reaches the model.

LitServe's own OpenAISpec covers chat completions only, answers a bad streaming request with HTTP 200 and
an error event, always reports finish_reason "stop" and has no `seed`; this spec serves chat completions
and completions from one model worker, validates and tokenizes in the HTTP process (so a bad request is a
400 before any stream starts), and answers each request as soon as its own text is finished, even while
other requests of its batch are still decoding.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from fastapi import Response
from fastapi.responses import StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from mistral_lightning.errors import UserError
from mistral_lightning.serving.requests import (
    ChatRequest,
    CompletionRequest,
    DecodingRequest,
    SamplingFields,
    decode_chat,
    decode_completion,
)
from mistral_lightning.serving.responses import (
    CHAT,
    COMPLETION,
    STREAM_END,
    Reply,
    error_body,
    error_response,
)
from mistral_lightning.tokenizer import Tokenizer

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
WORKER_FAILED = "the model worker failed on this request; its traceback is in the server's log"


class WorkerFailed(Exception):
    """The worker reported an error for this request (already logged there)."""


class OpenAIEndpoints(LitSpec):
    """Chat completions, completions and the model list of one served model."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, model_name: str) -> None:
        super().__init__()
        self.api_path = CHAT_PATH
        self.tokenizer: Tokenizer | None = tokenizer
        self.context_length = context_length
        self.model_name = model_name

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["tokenizer"] = None  # only the HTTP process validates; the worker loads its own tokenizer
        return state

    @property
    def stream(self) -> bool:
        return True

    def pre_setup(self, lit_api) -> None:
        self.add_endpoint(CHAT_PATH, self.chat_completions, ["POST"])
        self.add_endpoint(COMPLETIONS_PATH, self.completions, ["POST"])
        self.add_endpoint(MODELS_PATH, self.models, ["GET"])

    def decode_request(self, request: DecodingRequest, context_kwargs: dict | None = None) -> DecodingRequest:
        return request

    def encode_response(self, output, context_kwargs: dict | None = None):
        yield from output

    async def chat_completions(self, request: ChatRequest) -> Response:
        return await self._respond(request, CHAT, decode_chat)

    async def completions(self, request: CompletionRequest) -> Response:
        return await self._respond(request, COMPLETION, decode_completion)

    async def models(self) -> dict:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mistral-lightning"}
        return {"object": "list", "data": [model]}

    async def _respond(self, request: SamplingFields, kind: str, decode: Callable) -> Response:
        try:
            decoding = decode(request, self.tokenizer, self.context_length)
        except UserError as error:
            return error_response(400, str(error))
        reply = Reply(kind, self.model_name, len(decoding.prompt_ids))
        pieces = self._pieces(decoding)
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            events = self._events(reply, pieces, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        text: list[str] = []
        try:
            async for piece in pieces:
                text.append(piece["text"])
                if piece["finish_reason"]:
                    return reply.whole("".join(text), piece["finish_reason"], piece["completion_tokens"])
        except WorkerFailed:
            pass
        return error_response(500, WORKER_FAILED, "server_error")

    async def _events(
        self, reply: Reply, pieces: AsyncIterator[dict], include_usage: bool
    ) -> AsyncIterator[str]:
        if reply.kind == CHAT:
            yield reply.chunk(None, first=True)
        try:
            async for piece in pieces:
                if piece["text"]:
                    yield reply.chunk(piece["text"])
                if piece["finish_reason"]:
                    yield reply.chunk(None, piece["finish_reason"])
                    if include_usage:
                        yield reply.usage_chunk(piece["completion_tokens"])
        except WorkerFailed:
            yield f"data: {json.dumps(error_body(WORKER_FAILED, 'server_error'))}\n\n"
        yield STREAM_END

    async def _pieces(self, decoding: DecodingRequest) -> AsyncIterator[dict]:
        """This request's pieces from the worker, up to the one that finishes it."""
        uid = uuid.uuid4()
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), decoding))
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise WorkerFailed
                piece = json.loads(data) if data else None  # None: a step in which this request had no token
                if piece is None:
                    continue
                yield piece
                if piece["finish_reason"]:
                    return
            raise WorkerFailed  # the worker ended the stream without finishing the text
        finally:
            # Later pieces of this id (none are expected) are dropped by LitServe once its entry is gone.
            self.response_buffer.pop(uid, None)
