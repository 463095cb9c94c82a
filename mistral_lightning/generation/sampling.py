"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from mistral_lightning.errors import UserError


class GenerationError(UserError):
    """Bad input to generation: an empty prompt, a prompt that does not fit, an invalid sampling option."""


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. The generator must live on the logits' device."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float()
    # Scaled from the best score down: a tiny temperature gives -inf below the best, never inf - inf (NaN).
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
