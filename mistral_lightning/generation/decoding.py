"""Batched autoregressive decoding with a KV cache: chunked prefill, then one token per step.

Prompt-length policy: a prompt must be shorter than the model's context (`config.max_seq_length`);
it is never truncated silently (that would drop BOS or the start of an [INST] turn). Each row then
generates at most `max_seq_length - len(prompt)` tokens, even if `max_new_tokens` is larger.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mistral_lightning.generation.kv_cache import RollingKVCache
from mistral_lightning.generation.sampling import GenerationError, check_sampling_options, sample_next_tokens

# Long prompts are fed in chunks of this many tokens, so attention scores and logits stay bounded.
DEFAULT_PREFILL_CHUNK = 2048
# Filler for left padding; any valid id works, padded keys are masked out.
_PAD_ID = 0


def check_prompts(prompts: list[list[int]], max_seq_length: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given; pass a list of token-id lists")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {index} is empty; give at least one token (usually BOS)")
        if len(prompt) >= max_seq_length:
            raise GenerationError(
                f"prompt {index} has {len(prompt)} tokens but the model's context is {max_seq_length} "
                "(config.max_seq_length), leaving no room to generate; prompts are never truncated "
                "silently, so shorten it (or drop few-shot examples / earlier chat turns)"
            )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [B, P] with every prompt ending in the last column, and each row's number of pad slots."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), _PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    pad_lengths = torch.tensor([longest - len(prompt) for prompt in prompts], dtype=torch.long)
    return ids.to(device), pad_lengths.to(device)


def _last_position(logits: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last position; under tensor parallelism the LM head's output is a
    vocabulary-sharded DTensor, gathered here for that one position only."""
    last = logits[:, -1]
    return last.full_tensor() if isinstance(last, DTensor) else last


def _prefill(model: nn.Module, cache: RollingKVCache, ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Run the prompt through the model chunk by chunk; returns the last position's logits [B, V]."""
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        logits = model(chunk, cache.advance(chunk.shape[1]), kv_cache=cache, logits_to_keep=1)
    return _last_position(logits)


def _new_cache(model: nn.Module, pad_lengths: torch.Tensor, total_slots: int) -> RollingKVCache:
    window = model.config.sliding_window
    capacity = total_slots if window is None else min(total_slots, window)
    return RollingKVCache(pad_lengths, capacity, window)


@torch.no_grad()  # not inference_mode: FSDP2 (part of the training plan) rejects inference tensors
def next_token_logits(
    model: nn.Module, prompts: list[list[int]], *, prefill_chunk_size: int | None = None
) -> torch.Tensor:
    """Logits [B, V] (float32) for the token that would follow each prompt; prompts may differ in length."""
    check_prompts(prompts, model.config.max_seq_length)
    ids, pad_lengths = _left_padded(prompts, _model_device(model))
    cache = _new_cache(model, pad_lengths, ids.shape[1])
    return _prefill(model, cache, ids, prefill_chunk_size or DEFAULT_PREFILL_CHUNK).float()


def _ends_with_stop(tokens: list[int], eos_id: int | None, stop_sequences: list[list[int]]) -> bool:
    if eos_id is not None and tokens[-1] == eos_id:
        return True
    return any(stop and tokens[-len(stop) :] == stop for stop in stop_sequences)


@torch.no_grad()  # not inference_mode: FSDP2 (part of the training plan) rejects inference tensors
def stream_generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int | Sequence[int],
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = 2,
    stop_sequences: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk_size: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once that row has stopped); see `generate`.

    `send` the indices of prompts whose tokens are no longer wanted (e.g. their text reached a stop string)
    to stop those rows at once.
    """
    check_prompts(prompts, model.config.max_seq_length)
    check_sampling_options(temperature, top_k, top_p)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise GenerationError(f"max_new_tokens: {len(limits)} limits given for {len(prompts)} prompts")
    if min(limits) < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {min(limits)}")
    budgets = [
        min(limit, model.config.max_seq_length - len(prompt)) for limit, prompt in zip(limits, prompts)
    ]
    if max(budgets) == 0:
        return
    ids, pad_lengths = _left_padded(prompts, _model_device(model))
    # Each row holds its own prompt and new tokens, at most the context, whatever its batch mates need.
    cache = _new_cache(
        model, pad_lengths, max(len(prompt) + budget for prompt, budget in zip(prompts, budgets))
    )
    logits = _prefill(model, cache, ids, prefill_chunk_size or DEFAULT_PREFILL_CHUNK)
    generated: list[list[int]] = [[] for _ in prompts]
    running = [budget > 0 for budget in budgets]
    rows = list(range(len(prompts)))  # the prompt of each row still in the batch
    while True:
        tokens = sample_next_tokens(logits, temperature, top_k, top_p, generator)
        step: list[int | None] = [None] * len(prompts)
        for prompt, token in zip(rows, tokens.tolist()):
            if not running[prompt]:
                continue
            generated[prompt].append(token)
            step[prompt] = token
            stopped = _ends_with_stop(generated[prompt], eos_id, stop_sequences or [])
            running[prompt] = not stopped and len(generated[prompt]) < budgets[prompt]
        for prompt in (yield step) or ():  # rows the caller no longer needs
            running[prompt] = False
        kept = [row for row, prompt in enumerate(rows) if running[prompt]]
        if not kept:
            return
        if len(kept) < len(rows):  # stopped rows leave the batch and its cache
            cache.keep_rows(kept)
            tokens = tokens[torch.tensor(kept, device=tokens.device)]
            rows = [rows[row] for row in kept]
        logits = _last_position(model(tokens[:, None], cache.advance(1), kv_cache=cache))


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int | Sequence[int],
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = 2,
    stop_sequences: list[list[int]] | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk_size: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids, BOS included); returns only the new ids per prompt.

    temperature 0 is greedy decoding; otherwise logits are divided by the temperature, filtered by
    top_k / top_p and sampled with `generator` (seed it for reproducible output; it must live on the
    model's device, and under tensor parallelism be seeded alike on every rank). A row stops after
    `eos_id` or after any of `stop_sequences` (both are kept at the end of its output), after
    `max_new_tokens` (one number for every row, or one per row), or when it fills the model's context.
    The model is any module with a MistralConfig `config` whose forward takes `(input_ids, position_ids,
    kv_cache=...)`.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        stop_sequences=stop_sequences,
        generator=generator,
        prefill_chunk_size=prefill_chunk_size,
    ):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs
