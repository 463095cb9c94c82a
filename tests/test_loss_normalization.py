"""The loss of an optimizer step does not depend on the parallel layout.

On instruction data whose samples have very different numbers of response tokens, one micro-batch of the
whole global batch (DP=1), two accumulated micro-batches, two data-parallel ranks and two tensor-parallel
ranks log the same per-step losses and gradient norms; the first step's values equal a hand calculation
with a plain model and `F.cross_entropy`. `model.loss_normalization: micro_batch` (Megatron's mean per
micro-batch) equals the mean of the micro-batch means, a prompt-only micro-batch left out of that mean (by
hand: its loss and gradient are those of the other micro-batch alone). A global batch without a labelled
token is skipped.
The chunked loss's sum reduction, which the token mean is built on, is checked against F.cross_entropy.
"""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers.training import Recorder, datamodule, launch, module, trainer, write_instruction_data
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.errors import UserError
from mistral_lightning.kernels import chunked_cross_entropy
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.training.gradients import gradient_scale

pytestmark = pytest.mark.timeout(600)

GLOBAL_BATCH, SEQ_LENGTH, INIT_SEED = 4, 64, 3
# (prompt tokens, response tokens): responses of 1 to 40 tokens, and one prompt without a response,
# so micro-batches of two samples hold from 0 to about 80 labelled tokens.
SAMPLES = [
    (12, 1), (5, 40), (20, 3), (8, 30), (30, 0), (6, 2), (4, 35), (16, 6),
    (10, 25), (22, 1), (7, 12), (9, 38), (18, 4), (3, 28), (25, 2), (11, 20),
    (14, 9), (6, 33), (27, 5), (5, 1), (13, 22), (8, 3), (19, 31), (4, 7),
]  # fmt: skip


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> str:
    return write_instruction_data(str(tmp_path_factory.mktemp("uneven") / "sft"), SAMPLES)


def _fit(data: str, root, accumulate: int = 1, **module_settings) -> Recorder:
    """One process, DP=1: GLOBAL_BATCH samples per step in `accumulate` micro-batches."""
    recorder = Recorder(keep_batches=True)
    trainer(root, accumulate=accumulate, callbacks=[recorder]).fit(
        module(**module_settings),
        datamodule=datamodule(
            data, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH, accumulate=accumulate, instruction=True
        ),
    )
    return recorder


@pytest.fixture(scope="module")
def whole_batch(uneven_data, single_thread, tmp_path_factory) -> Recorder:
    return _fit(uneven_data, tmp_path_factory.mktemp("whole"))


@pytest.fixture(scope="module")
def accumulated(uneven_data, single_thread, tmp_path_factory) -> Recorder:
    return _fit(uneven_data, tmp_path_factory.mktemp("accumulated"), accumulate=2)


@pytest.fixture(scope="module")
def accumulated_micro_batch(uneven_data, single_thread, tmp_path_factory) -> Recorder:
    return _fit(
        uneven_data,
        tmp_path_factory.mktemp("accumulated_mb"),
        accumulate=2,
        loss_normalization="micro_batch",
    )


@pytest.fixture(scope="module")
def two_ranks(uneven_data, tmp_path_factory) -> dict:
    common = {
        "data": uneven_data,
        "instruction": True,
        "global_batch": GLOBAL_BATCH,
        "seq_length": SEQ_LENGTH,
    }
    scenarios = [
        {"name": "dp2", "data_parallel": 2, **common},
        {
            "name": "dp2_micro_batch",
            "data_parallel": 2,
            "module": {"loss_normalization": "micro_batch"},
            **common,
        },
        {"name": "tp2", "tensor_parallel": 2, **common},
        {"name": "dp2_accumulated", "data_parallel": 2, "accumulate": 2, **common},
    ]
    codes, results, output = launch(scenarios, tmp_path_factory.mktemp("two_ranks"), nprocs=2)
    assert codes == [0, 0] and results is not None, output
    return results


def _reference_first_step(micro_batches: list[dict[str, torch.Tensor]], per_micro_batch: bool):
    """(loss, gradient norm) of the initial weights by hand: a plain model's logits and F.cross_entropy,
    token losses summed over every micro-batch and divided by their count, or (Megatron) each micro-batch's
    mean, averaged over the micro-batches."""
    model = Mistral(MistralConfig.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(INIT_SEED))
    sums, counts = [], []
    for batch in micro_batches:
        logits = model(batch["input_ids"], batch["position_ids"], document_ids=batch["document_ids"])
        sums.append(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"))
        counts.append(int((batch["labels"] != IGNORE_INDEX).sum()))
    if per_micro_batch:
        loss = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    else:
        loss = sum(sums) / sum(counts)
    loss.backward()
    grad_norm = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    return float(loss), float(grad_norm)


def test_first_step_is_the_token_mean_over_the_global_batch(whole_batch, accumulated):
    loss, grad_norm = _reference_first_step(accumulated.kept[:2], per_micro_batch=False)
    assert whole_batch.losses[0] == pytest.approx(loss, rel=1e-5)
    assert whole_batch.grad_norms[0] == pytest.approx(grad_norm, rel=1e-5)
    # The data is uneven enough for the per-micro-batch mean to be a different number.
    megatron_loss, _ = _reference_first_step(accumulated.kept[:2], per_micro_batch=True)
    assert abs(megatron_loss - loss) > 1e-4 * loss


def _assert_same_steps(losses: list[float], grad_norms: list[float], reference: Recorder) -> None:
    assert len(reference.losses) == 6
    assert losses == pytest.approx(reference.losses, rel=1e-5)
    assert grad_norms == pytest.approx(reference.grad_norms, rel=1e-5)


def test_accumulated_micro_batches_log_the_losses_of_the_whole_batch(whole_batch, accumulated):
    _assert_same_steps(accumulated.losses, accumulated.grad_norms, whole_batch)


@pytest.mark.processes
@pytest.mark.parametrize("layout", ["dp2", "tp2", "dp2_accumulated"])
def test_two_ranks_log_the_losses_of_the_whole_batch(layout, whole_batch, two_ranks):
    _assert_same_steps(two_ranks[layout]["losses"], two_ranks[layout]["grad_norms"], whole_batch)


@pytest.mark.processes
def test_one_all_reduce_per_optimizer_step(two_ranks):
    # 12 micro-batches (2 per step on each rank), 6 optimizer steps: the step's totals are reduced once.
    assert two_ranks["dp2_accumulated"]["all_reduces"] == 6


@pytest.mark.processes
def test_micro_batch_normalization_is_the_mean_of_micro_batch_means(accumulated_micro_batch, two_ranks):
    loss, grad_norm = _reference_first_step(accumulated_micro_batch.kept[:2], per_micro_batch=True)
    assert accumulated_micro_batch.losses[0] == pytest.approx(loss, rel=1e-5)
    assert accumulated_micro_batch.grad_norms[0] == pytest.approx(grad_norm, rel=1e-5)
    # Two data-parallel ranks average the same two micro-batches.
    dp2 = two_ranks["dp2_micro_batch"]
    assert dp2["losses"] == pytest.approx(accumulated_micro_batch.losses, rel=1e-5)
    assert dp2["grad_norms"] == pytest.approx(accumulated_micro_batch.grad_norms, rel=1e-5)


@pytest.mark.parametrize("head_kind", ["fused-linear", "generic-module"])
def test_chunked_loss_sum_and_its_gradients_equal_plain_cross_entropy(head_kind):
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    head = linear if head_kind == "fused-linear" else (lambda x: linear(x))
    hidden = torch.randn(2, 30, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (2, 30), generator=generator)
    labels[:, ::3] = IGNORE_INDEX
    loss = chunked_cross_entropy(hidden, head, labels, 7, reduction="sum")
    reference = F.cross_entropy(linear(hidden).flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(
        torch.autograd.grad(2.5 * loss, (hidden, linear.weight)),
        torch.autograd.grad(2.5 * reference, (hidden, linear.weight)),
    ):
        torch.testing.assert_close(got, expected)


class WeightsAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append({n: p.detach().to_local().clone() for n, p in pl_module.model.named_parameters()})


def _next_token_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of 2 × 16 random tokens, each labelled with the next one."""
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 2000, (2, 16), generator=generator)} for _ in range(count)]
    for batch in batches:
        batch["labels"] = batch["input_ids"].roll(-1, 1)
    return batches


def test_a_global_batch_without_labelled_tokens_is_skipped(single_thread, tmp_path):
    batches = _next_token_batches(3)
    batches[1]["labels"] = torch.full_like(batches[1]["labels"], IGNORE_INDEX)
    weights = WeightsAfterEachStep()
    fit_trainer = trainer(
        tmp_path,
        max_steps=3,
        callbacks=[weights],
        logger=CSVLogger(tmp_path, name="log", version=0),
        log_every_n_steps=1,
        use_distributed_sampler=False,  # keep the batches in order
    )
    with pytest.warns(UserWarning, match="no labelled token") as caught:
        fit_trainer.fit(module(), train_dataloaders=DataLoader(batches, batch_size=None))
    assert sum("no labelled token" in str(w.message) for w in caught) == 1

    after_first, after_empty, after_third = weights.weights
    assert all(torch.equal(after_empty[name], after_first[name]) for name in after_first)  # no decay either
    assert not torch.equal(after_third["lm_head.weight"], after_empty["lm_head.weight"])
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as log:
        rows = list(csv.DictReader(log))
    # Nothing new for the skipped step (Lightning's loggers repeat a metric's last value), and its count.
    losses = [float(row["train/loss"]) for row in rows]
    assert losses[1] == losses[0] and losses[2] != losses[0] and min(losses) > 0
    assert [row["train/skipped_steps"] for row in rows] == ["", "1.0", "1.0"]


def test_micro_batch_rule_leaves_a_prompt_only_micro_batch_out_of_its_mean(single_thread, tmp_path):
    """Two accumulated micro-batches, the first without a labelled token: Megatron's mean has no value for it,
    so the step's loss and gradient are the second one's mean, computed by hand with F.cross_entropy."""
    batches = _next_token_batches(2)
    batches[0]["labels"] = torch.full_like(batches[0]["labels"], IGNORE_INDEX)
    recorder = Recorder()
    fit_trainer = trainer(
        tmp_path, max_steps=1, accumulate=2, callbacks=[recorder], use_distributed_sampler=False
    )
    fit_trainer.fit(
        module(loss_normalization="micro_batch"), train_dataloaders=DataLoader(batches, batch_size=None)
    )

    model = Mistral(MistralConfig.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(INIT_SEED))
    logits = model(batches[1]["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batches[1]["labels"].flatten())
    loss.backward()
    grad_norm = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    assert recorder.losses == pytest.approx([float(loss)], rel=1e-5)
    assert recorder.grad_norms == pytest.approx([float(grad_norm)], rel=1e-5)


def test_unknown_loss_normalization_is_refused_naming_the_option():
    with pytest.raises(
        UserError, match=r"model.loss_normalization='mean' is not one of 'token', 'micro_batch'"
    ):
        module(loss_normalization="mean")


def test_the_gradient_scale_turns_averaged_micro_batch_sums_into_the_step_token_mean():
    """Hand calculation: 2 ranks × 2 micro-batches, 10 labelled tokens in all. After the backward each gradient
    is the mean of 4 summed losses' gradients; the step's loss is their sum over 10 tokens: 4/10."""
    assert gradient_scale(10, averaged_over_ranks=2, accumulate_grad_batches=2) == pytest.approx(0.4)
    # micro_batch rule: the denominator is the micro-batch count itself, so nothing changes.
    assert gradient_scale(4, averaged_over_ranks=2, accumulate_grad_batches=2) == 1.0
