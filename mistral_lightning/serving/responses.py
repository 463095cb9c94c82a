"""OpenAI response bodies: whole responses, server-sent-event chunks, and the error object."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

CHAT = "chat"
COMPLETION = "completion"
STREAM_END = "data: [DONE]\n\n"
INVALID_API_KEY = "missing or wrong API key; send the server's --api-key as `Authorization: Bearer <key>`"


@dataclass
class Reply:
    """One response being built: its id, kind (CHAT or COMPLETION), model name and token counts."""

    kind: str
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.kind == CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _body(self, choices: list[dict], chunk: bool) -> dict:
        kind = "chat.completion" if self.kind == CHAT else "text_completion"
        object_name = f"{kind}.chunk" if chunk and self.kind == CHAT else kind
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        if self.kind == CHAT:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._body([choice], chunk=False), "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> str:
        """One server-sent event; for chat the first carries the role, and the last an empty delta."""
        if self.kind == CHAT:
            delta = (
                {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            )
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return f"data: {json.dumps(self._body([choice], chunk=True))}\n\n"

    def usage_chunk(self, completion_tokens: int) -> str:
        """The extra last event `stream_options: {"include_usage": true}` asks for: no choices, the usage."""
        return (
            f"data: {json.dumps({**self._body([], chunk=True), 'usage': self.usage(completion_tokens)})}\n\n"
        )


def error_body(message: str, error_type: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def error_response(
    status: int, message: str, error_type: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, error_type, code))


def add_error_handlers(app: FastAPI, max_request_bytes: int) -> None:
    """Errors in OpenAI's error object: a body that does not parse (a missing field, a string for a
    number) gets 400 with one line naming each bad field, instead of FastAPI's 422 list; every other HTTP
    error (401, 404, 405, 413) keeps its status."""

    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"] if part != "body") or "body"
            problems.append(f"{field}: {problem['msg']}")
        return error_response(400, "; ".join(problems))

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 413:
            message = (
                f"request body: larger than this server's --max-request-bytes {max_request_bytes}; "
                "send a shorter prompt"
            )
            return error_response(413, message)
        code = "invalid_api_key" if error.status_code == 401 else None
        response = error_response(error.status_code, str(error.detail), code=code)
        response.headers.update(error.headers or {})  # e.g. Allow, with 405
        return response

    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
