"""The gradient's scale, decided in one place once per optimizer step.

Three things touch the gradients before the optimizer sees them:
1. each micro-batch's backward runs on what `training_step` returns: the sum of its token losses
   (`loss_normalization: token`) or their mean (`micro_batch`);
2. Lightning divides that loss by `trainer.accumulate_grad_batches` before the backward;
3. FSDP2's reduce-scatter averages the gradients over the ranks it shards over (data parallelism).

So after the step's last backward each gradient is that of Σ_ranks Σ_micro-batches loss / (ranks ×
accumulation). The step's loss is Σ_ranks Σ_micro-batches loss / denominator, where the denominator is the
global batch's labelled-token count (token rule) or its count of micro-batches that hold a labelled token
(micro_batch rule: a prompt-only micro-batch has no mean, so it counts in neither sum), so `gradient_scale`
is the factor that turns the former into the gradient of the latter. Under the micro_batch rule it is 1
when every micro-batch of every rank holds a labelled token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def gradient_scale(denominator: float, averaged_over_ranks: int, accumulate_grad_batches: int) -> float:
    """The factor for the gradients after the step's last backward (see the module doc)."""
    return averaged_over_ranks * accumulate_grad_batches / denominator


@torch.no_grad()
def scale_gradients_(parameters: Iterable[torch.nn.Parameter], scale: float) -> None:
    if scale == 1.0:
        return
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_(scale)
