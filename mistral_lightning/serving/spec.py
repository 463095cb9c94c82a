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
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from mistral_lightning.errors import UserError
from mistral_lightning.serving.disconnects import Disconnects
from mistral_lightning.serving.requests import (
    ChatRequest,
    CompletionRequest,
    DecodingRequest,
    PromptLimits,
    SamplingFields,
    decode_chat,
    decode_completion,
)
from mistral_lightning.serving.responses import (
    CHAT,
    COMPLETION,
    INVALID_API_KEY,
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

    def __init__(
        self, tokenizer: Tokenizer, limits: PromptLimits, model_name: str, api_key: str | None
    ) -> None:
        super().__init__()
        self.api_path = CHAT_PATH
        self.tokenizer: Tokenizer | None = tokenizer
        self.limits = limits
        self.model_name = model_name
        self.api_key = api_key
        self.disconnects = Disconnects()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        # Only the HTTP process validates and authorizes; the worker loads its own tokenizer.
        state.update(tokenizer=None, api_key=None)
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

    def _check_api_key(self, connection: Request) -> None:
        """With --api-key, every /v1 route needs `Authorization: Bearer <key>`, as OpenAI clients send it.
        (LitServe's `authorize` hook would guard /health too, which load balancers probe without a key.)"""
        if self.api_key is None:
            return
        scheme, _, key = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            raise HTTPException(401, INVALID_API_KEY)

    async def chat_completions(self, request: ChatRequest, connection: Request) -> Response:
        return await self._respond(request, connection, CHAT, decode_chat)

    async def completions(self, request: CompletionRequest, connection: Request) -> Response:
        return await self._respond(request, connection, COMPLETION, decode_completion)

    async def models(self, connection: Request) -> dict:
        self._check_api_key(connection)
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mistral-lightning"}
        return {"object": "list", "data": [model]}

    async def _respond(
        self, request: SamplingFields, connection: Request, kind: str, decode: Callable
    ) -> Response:
        self._check_api_key(connection)
        if request.model is not None and request.model != self.model_name:
            return error_response(
                404, f"model: this server serves the model `{self.model_name}` only", code="model_not_found"
            )
        try:
            # Tokenizing a long prompt takes a while: in a thread, other requests are served meanwhile.
            decoding = await run_in_threadpool(decode, request, self.tokenizer, self.limits)
        except UserError as error:
            return error_response(400, str(error))
        reply = Reply(kind, self.model_name, len(decoding.prompt_ids))
        if request.stream:
            # Starlette cancels a stream whose client disconnects, which ends `_pieces`.
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            events = self._events(reply, self._pieces(decoding, None), include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        text: list[str] = []
        try:
            async with aclosing(self._pieces(decoding, connection)) as pieces:
                async for piece in pieces:
                    text.append(piece["text"])
                    if piece["finish_reason"]:
                        return reply.whole("".join(text), piece["finish_reason"], piece["completion_tokens"])
        except WorkerFailed:
            pass
        except ClientDisconnect:
            return Response(status_code=204)  # nobody reads it
        return error_response(500, WORKER_FAILED, "server_error")

    async def _events(
        self, reply: Reply, pieces: AsyncIterator[dict], include_usage: bool
    ) -> AsyncIterator[str]:
        if reply.kind == CHAT:
            yield reply.chunk(None, first=True)
        try:
            async with aclosing(pieces):
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

    async def _pieces(self, decoding: DecodingRequest, connection: Request | None) -> AsyncIterator[dict]:
        """This request's pieces from the worker, up to the one that finishes it; the worker is told to stop
        if this ends first (its stream was cancelled, or `connection` is given and has disconnected)."""
        uid = decoding.request_id
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=queue)
        finished = False  # set before the last piece is handed out, as the consumer may stop right there
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), decoding))
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise WorkerFailed
                if connection is not None and await connection.is_disconnected():
                    raise ClientDisconnect
                piece = json.loads(data) if data else None  # None: a step in which this request had no token
                if piece is None:
                    continue
                if "error" in piece:
                    raise WorkerFailed
                finished = bool(piece["finish_reason"])
                yield piece
                if finished:
                    return
            raise WorkerFailed  # the worker ended the stream without finishing the text
        except (asyncio.CancelledError, GeneratorExit, ClientDisconnect):
            if not finished:
                self.disconnects.report(uid)
            raise
        finally:
            # Later pieces of this id are dropped by LitServe once its entry is gone.
            self.response_buffer.pop(uid, None)
