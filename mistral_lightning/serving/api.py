"""The LitServe model worker: loads the checkpoint once, then decodes the batches LitServe collects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import litserve as ls

from mistral_lightning.generation.loading import load_for_inference
from mistral_lightning.generation.settings import InferenceSettings
from mistral_lightning.serving.decoding import decode_requests
from mistral_lightning.serving.requests import DecodingRequest
from mistral_lightning.serving.spec import OpenAIEndpoints


@dataclass(frozen=True)
class ModelSettings:
    """What the worker needs (the `serve` options, picklable): how to load the model, and its prefill chunk."""

    model: InferenceSettings
    prefill_chunk_size: int | None


class MistralAPI(ls.LitAPI):
    """One model on the device `--device` names (LitServe's own device choice is not used: it knows no NPU)."""

    def __init__(
        self, settings: ModelSettings, spec: OpenAIEndpoints, max_batch_size: int, batch_timeout: float
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec)
        self.settings = settings
        self.disconnects = spec.disconnects  # reported by the HTTP process, read here per step

    def setup(self, device: str) -> None:
        self.model, self.tokenizer = load_for_inference(self.settings.model)

    def decode_request(self, request: DecodingRequest, **kwargs) -> DecodingRequest:
        return request

    def predict(self, requests: DecodingRequest | list[DecodingRequest], **kwargs) -> Iterator:
        # LitServe hands a list when batching (--max-batch-size > 1), else one request.
        batch = requests if isinstance(requests, list) else [requests]
        decoding = decode_requests(
            self.model, self.tokenizer, batch, self.settings.prefill_chunk_size, self.disconnects
        )
        for pieces in decoding:
            yield pieces if isinstance(requests, list) else pieces[0]

    def encode_response(self, outputs: Iterator, **kwargs) -> Iterator:
        yield from outputs
