"""DPO through `fit`: the layout does not change what a step computes, a resume continues bit for bit, and the
result exports to transformers.

Pairs of very different lengths are packed into rows (one to three pairs a row), so micro-batches hold different
numbers of pairs: one micro-batch of the whole global batch, two accumulated micro-batches, two data-parallel
ranks and two tensor-parallel ranks log the same per-step losses and gradient norms (full fine-tuning against a
frozen copy, and LoRA against the adapters switched off). The first step is checked by hand with a plain model,
`F.log_softmax` and DPO's formula: the policy is the reference then, so the loss is log 2 and the gradient
-β/2 (∇ log π(chosen) - ∇ log π(rejected)) averaged over the pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.training import (
    Recorder,
    datamodule,
    launch,
    module,
    trainer,
    write_instruction_data,
    write_preference_data,
)

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.cli import main as cli_main
from mistral_lightning.errors import UserError
from mistral_lightning.labels import IGNORE_INDEX

pytestmark = pytest.mark.timeout(600)

GLOBAL_BATCH, SEQ_LENGTH, INIT_SEED, BETA = 4, 64, 3, 0.5
_rng = torch.Generator().manual_seed(5)
# (prompt, chosen, rejected) token counts; a pair takes (prompt + chosen - 1) + (prompt + rejected - 1) positions.
PAIRS = [
    tuple(int(torch.randint(low, high, (), generator=_rng)) for low, high in ((3, 12), (1, 14), (1, 14)))
    for _ in range(64)
]
DPO = {"kind": "dpo", "beta": BETA}
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "down"]}


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> str:
    return write_preference_data(str(tmp_path_factory.mktemp("pairs") / "dpo"), PAIRS)


def _fit(data: str, root, accumulate: int = 1, callbacks=(), **module_settings):
    recorder = Recorder(keep_batches=True)
    fit_trainer = trainer(root, accumulate=accumulate, callbacks=[recorder, *callbacks])
    lightning_module = module(objective=DPO, **module_settings)
    fit_trainer.fit(
        lightning_module,
        datamodule=datamodule(
            data, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH, accumulate=accumulate, preference=True
        ),
    )
    return recorder, fit_trainer


@pytest.fixture(scope="module")
def whole_batch(pairs_data, single_thread, tmp_path_factory):
    return _fit(pairs_data, tmp_path_factory.mktemp("whole"))


@pytest.fixture(scope="module")
def lora_whole_batch(pairs_data, single_thread, tmp_path_factory):
    return _fit(pairs_data, tmp_path_factory.mktemp("lora_whole"), lora=LORA)


@pytest.fixture(scope="module")
def two_ranks(pairs_data, tmp_path_factory) -> dict:
    common = {"data": pairs_data, "preference": True, "global_batch": GLOBAL_BATCH, "seq_length": SEQ_LENGTH}
    dpo = {"objective": DPO}
    scenarios = [
        {"name": "dp2", "data_parallel": 2, "module": dpo, **common},
        {"name": "tp2", "tensor_parallel": 2, "module": dpo, **common},
        {"name": "dp2_accumulated", "data_parallel": 2, "accumulate": 2, "module": dpo, **common},
        {"name": "lora_tp2", "tensor_parallel": 2, "module": {**dpo, "lora": LORA}, **common},
        {"name": "cp2", "context_parallel": 2, "module": dpo, "expect_error": True, **common},
    ]
    codes, results, output = launch(scenarios, tmp_path_factory.mktemp("two_ranks"), nprocs=2)
    assert codes == [0, 0] and results is not None, output
    return results


def _answer_log_probs(
    model: Mistral, batch: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair of the batch, by hand: (log π(chosen), log π(rejected)) from the full logits, the pair's
    documents read from `document_ids` one row and one document at a time."""
    logits = model(batch["input_ids"], batch["position_ids"], document_ids=batch["document_ids"])
    log_probs = F.log_softmax(logits.double(), dim=-1)
    pairs = []
    for row in range(len(batch["input_ids"])):
        documents, labels = batch["document_ids"][row], batch["labels"][row]
        sums = []
        for document in range(int(documents.max()) + 1):
            positions = ((documents == document) & (labels != IGNORE_INDEX)).nonzero().squeeze(1)
            sums.append(log_probs[row, positions, labels[positions]].sum())
        pairs += [(sums[k], sums[k + 1]) for k in range(0, len(sums), 2)]
    return pairs


def test_first_step_is_dpo_of_the_starting_model_by_hand(whole_batch):
    recorder, _ = whole_batch
    model = Mistral(MistralConfig.from_name("tiny"))
    model.init_weights(torch.Generator().manual_seed(INIT_SEED))
    pairs = _answer_log_probs(model, recorder.kept[0])
    assert len(pairs) > GLOBAL_BATCH  # packed: more pairs than rows
    losses = [-F.logsigmoid(BETA * ((c - c.detach()) - (r - r.detach()))) for c, r in pairs]
    loss = torch.stack(losses).mean()
    loss.backward()
    grad_norm = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    assert recorder.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-12)
    assert recorder.grad_norms[0] == pytest.approx(float(grad_norm), rel=1e-5)


def test_rewards_accuracy_and_log_probabilities_are_logged(whole_batch):
    recorder, fit_trainer = whole_batch
    metrics = {name: float(value) for name, value in fit_trainer.callback_metrics.items()}
    chosen, rejected = metrics["train/rewards/chosen"], metrics["train/rewards/rejected"]
    assert metrics["train/rewards/margins"] == pytest.approx(chosen - rejected, abs=1e-6)
    assert 0 <= metrics["train/rewards/accuracies"] <= 1
    assert metrics["train/logps/chosen"] < 0 and metrics["train/logps/rejected"] < 0
    # The policy moved: the rewards are no longer the first step's zeros.
    assert abs(chosen) + abs(rejected) > 0
    assert recorder.losses[-1] != pytest.approx(math.log(2), abs=1e-6)


def _assert_same_steps(losses, grad_norms, reference: Recorder) -> None:
    assert len(reference.losses) == 6
    assert losses == pytest.approx(reference.losses, rel=1e-5)
    assert grad_norms == pytest.approx(reference.grad_norms, rel=1e-5)


def test_accumulated_micro_batches_log_the_losses_of_the_whole_batch(pairs_data, whole_batch, tmp_path):
    accumulated, _ = _fit(pairs_data, tmp_path, accumulate=2)
    # The two micro-batches of some steps hold different numbers of pairs, where a mean of means would differ.
    counts = [int(batch["document_ids"].amax(dim=1).add(1).sum()) // 2 for batch in accumulated.kept]
    assert any(first != second for first, second in zip(counts[::2], counts[1::2]))
    _assert_same_steps(accumulated.losses, accumulated.grad_norms, whole_batch[0])


@pytest.mark.processes
@pytest.mark.parametrize("layout", ["dp2", "tp2", "dp2_accumulated"])
def test_two_ranks_log_the_losses_of_the_whole_batch(layout, whole_batch, two_ranks):
    _assert_same_steps(two_ranks[layout]["losses"], two_ranks[layout]["grad_norms"], whole_batch[0])


@pytest.mark.processes
def test_lora_under_tensor_parallelism_logs_the_one_process_losses(lora_whole_batch, two_ranks):
    recorder, _ = lora_whole_batch
    assert recorder.losses[0] == pytest.approx(
        math.log(2), abs=1e-6
    )  # B = 0: the adapters change nothing yet
    _assert_same_steps(two_ranks["lora_tp2"]["losses"], two_ranks["lora_tp2"]["grad_norms"], recorder)


@pytest.mark.processes
def test_context_parallelism_is_refused_before_the_first_step(two_ranks):
    assert two_ranks["cp2"]["steps_started"] == 0
    assert "does not run under context parallelism" in two_ranks["cp2"]["error"]


def test_resume_continues_bit_for_bit(pairs_data, single_thread, tmp_path):
    data = datamodule(pairs_data, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH, preference=True)
    straight = Recorder()
    trainer(tmp_path / "straight", max_steps=4, callbacks=[straight], checkpoint_every=2).fit(
        module(objective=DPO), datamodule=data
    )
    resumed = Recorder()
    checkpoint = tmp_path / "straight" / "checkpoints" / "step=2.ckpt"
    trainer(tmp_path / "resumed", max_steps=4, callbacks=[resumed]).fit(
        module(objective=DPO),
        datamodule=datamodule(pairs_data, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH, preference=True),
        ckpt_path=checkpoint,
    )
    assert resumed.losses == straight.losses[2:]
    assert resumed.grad_norms == straight.grad_norms[2:]
    assert resumed.batches == straight.batches[2:]


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora-merged"])
def test_export_loads_in_transformers_with_the_trained_logits(pairs_data, single_thread, tmp_path, lora):
    from transformers import MistralForCausalLM

    data = datamodule(pairs_data, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH, preference=True)
    fit_trainer = trainer(tmp_path / "run", max_steps=2, checkpoint_every=2, distributed_checkpoint=False)
    trained = module(objective=DPO, lora=lora)
    fit_trainer.fit(trained, datamodule=data)
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained.model(ids)
    assert (
        cli_main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "run" / "checkpoints" / "step=2.ckpt"),
                "--out",
                str(tmp_path / "hf"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    theirs = MistralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("settings", "preference", "message"),
    [
        ({"objective": DPO}, False, "needs preference pairs"),
        ({}, True, "would train on the rejected answers"),
    ],
    ids=["dpo-on-sft-data", "sft-on-pairs"],
)
def test_objective_and_data_must_agree(pairs_data, tmp_path, settings, preference, message):
    data = (
        datamodule(pairs_data, seq_length=SEQ_LENGTH, global_batch=GLOBAL_BATCH, preference=True)
        if preference
        else datamodule(
            write_instruction_data(str(tmp_path / "sft"), [(4, 4)] * 8),
            global_batch=GLOBAL_BATCH,
            instruction=True,
        )
    )
    with pytest.raises(UserError, match=message):
        trainer(tmp_path, max_steps=1).fit(module(**settings), datamodule=data)


def test_dpo_refuses_a_starting_adapter_it_would_not_compare_against(tmp_path):
    with pytest.raises(UserError, match="merge it into the base"):
        module(objective=DPO, lora={**LORA, "adapter": str(tmp_path)}, pretrained=str(tmp_path))


@pytest.mark.parametrize("config", ["configs/tiny/dpo.yaml", "configs/mistral-7b-32k/dpo_lora_1dev.yaml"])
def test_dpo_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert "  objective:\n    kind: dpo\n" in capsys.readouterr().out
