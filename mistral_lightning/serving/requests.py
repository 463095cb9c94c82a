"""OpenAI request bodies, checked and tokenized into what the model worker decodes.

Every mistake becomes a `RequestError` whose one-line message names the field and what to do; the server
answers it with HTTP 400 before the request reaches the model, so a stream never starts for a bad request.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel

from mistral_lightning.errors import UserError
from mistral_lightning.prompts import encode_chat_prompt
from mistral_lightning.tokenizer import Tokenizer

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_STOP_LENGTH = 1000  # characters; the text held back per token is as long as the longest stop string
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class RequestError(UserError):
    """A request the server cannot honour; answered with HTTP 400 and this message."""


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None


class SamplingFields(BaseModel):
    """The fields both endpoints share; anything else a client sends is ignored, as OpenAI's API does."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class PromptLimits:
    """The model's context and the server's prompt limit, in tokens."""

    context_length: int
    max_prompt_tokens: int | None  # --max-prompt-tokens; None: the context is the only limit


@dataclass(frozen=True)
class DecodingRequest:
    """What the model worker needs: prompt ids and the checked sampling options."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def decode_chat(request: ChatRequest, tokenizer: Tokenizer, limits: PromptLimits) -> DecodingRequest:
    """A chat request as the model's own chat format (mistral-common) encodes it, ending on a user turn."""
    _refuse(request.tools, "tools", "function calling is not supported; leave out tools")
    messages = [
        {"role": message.role, "content": _text(index, message)}
        for index, message in enumerate(request.messages)
    ]
    prompt_ids = encode_chat_prompt(tokenizer, messages)  # TemplateError (a UserError) names the bad message
    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    return _decoding(request, prompt_ids, max_tokens, limits)


def decode_completion(
    request: CompletionRequest, tokenizer: Tokenizer, limits: PromptLimits
) -> DecodingRequest:
    """A text prompt, encoded with BOS as `generate --prompt` encodes it."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError(f"prompt: got a list of {len(prompt)} prompts; send one prompt per request")
        prompt = prompt[0]
    if not prompt.strip():
        raise RequestError("prompt: is empty; give the text to continue")
    _refuse(request.echo, "echo", "the prompt is not echoed; leave out echo")
    _refuse(
        request.logprobs is not None, "logprobs", "log-probabilities are not returned; leave out logprobs"
    )
    _refuse(request.suffix, "suffix", "insertion is not supported; leave out suffix")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    return _decoding(request, tokenizer.encode(prompt, bos=True), max_tokens, limits)


def _refuse(value: object, field: str, advice: str) -> None:
    if value:
        raise RequestError(f"{field}: {advice}")


def _text(index: int, message: ChatMessage) -> str:
    """A message's text; OpenAI's list-of-parts form is accepted when every part is text."""
    if not isinstance(message.content, list):
        return message.content or ""
    kinds = {part.get("type") for part in message.content} - {"text"}
    if kinds:
        raise RequestError(
            f"messages[{index}].content: only text parts are supported, got {sorted(map(str, kinds))}"
        )
    return "".join(str(part.get("text", "")) for part in message.content)


def _decoding(
    request: SamplingFields, prompt_ids: list[int], max_tokens: int | None, limits: PromptLimits
) -> DecodingRequest:
    if request.n not in (None, 1):
        raise RequestError(
            f"n: {request.n} choices asked; this server returns one choice per request, send n requests"
        )
    for penalty in ("presence_penalty", "frequency_penalty"):
        _refuse(
            getattr(request, penalty), penalty, "penalties are not supported; leave it out or set it to 0"
        )
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            f"temperature: must be between 0 and {MAX_TEMPERATURE:g} (0 is greedy), got {temperature:g}"
        )
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p: must be in (0, 1] (1 keeps every token), got {top_p:g}")
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise RequestError("seed: must fit in 64 bits (from -2**63 to 2**64 - 1)")
    if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
        raise RequestError(
            f"messages/prompt: {len(prompt_ids)} tokens, more than this server's --max-prompt-tokens "
            f"{limits.max_prompt_tokens}; shorten the prompt"
        )
    context_length = limits.context_length
    room = context_length - len(prompt_ids)
    if room <= 0:
        raise RequestError(
            f"messages/prompt: {len(prompt_ids)} tokens, but the model's context is {context_length} tokens; "
            "shorten the prompt (prompts are never truncated)"
        )
    if max_tokens is None:
        max_tokens = room  # OpenAI's chat default: as much as the context allows
    if max_tokens < 1:
        raise RequestError(f"max_tokens: must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise RequestError(
            f"max_tokens: {max_tokens} new tokens after a {len(prompt_ids)}-token prompt exceed the model's "
            f"context of {context_length} tokens; ask for at most {room}"
        )
    return DecodingRequest(prompt_ids, max_tokens, temperature, top_p, request.seed, _stops(request.stop))


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop: {len(stops)} stop strings given; at most {MAX_STOP_STRINGS} are allowed")
    if "" in stops:
        raise RequestError('stop: "" would stop before the first character; give non-empty stop strings')
    if max(map(len, stops), default=0) > MAX_STOP_LENGTH:
        raise RequestError(f"stop: a stop string is longer than {MAX_STOP_LENGTH} characters; shorten it")
    return stops
