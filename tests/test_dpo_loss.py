"""DPO's per-pair losses, rewards and gradients, checked against TRL's `DPOTrainer` on transformers'
MistralForCausalLM with the same weights and token ids: full fine-tuning (a separate frozen reference) and LoRA
(PEFT's adapters; the reference is the base with the adapters off). Label smoothing and IPO are checked against
their formulas computed by hand from TRL's log-probabilities."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.models import adapted

from mistral_lightning import Mistral, MistralConfig
from mistral_lightning.adapters.lora import LoRAConfig, adapters_disabled
from mistral_lightning.adapters.peft_format import peft_module_name, save_peft_adapter
from mistral_lightning.checkpoint.hf import to_hf_name
from mistral_lightning.labels import IGNORE_INDEX
from mistral_lightning.training.preference import ObjectiveConfig, pair_sums, preference_losses

VOCAB = 128
# (prompt, chosen answer, rejected answer) token ids of different lengths, fixed by a seed.
_generator = torch.Generator().manual_seed(3)
PAIRS = [
    tuple(torch.randint(3, VOCAB, (n,), generator=_generator).tolist() for n in lengths)
    for lengths in ((6, 4, 3), (9, 2, 5), (4, 7, 6))
]
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "up", "down"))


def tiny_model() -> Mistral:
    model = Mistral(MistralConfig.from_name("tiny", vocab_size=VOCAB, initializer_range=0.2))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def perturbed(model: Mistral, seed: int = 1, scale: float = 0.05) -> Mistral:
    """A copy whose weights moved away from `model`'s, as a policy's do after some training."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def pair_rows(pairs, per_row: int = 1) -> dict[str, torch.Tensor]:
    """The preference DataModule's batch, written out by hand: `per_row` pairs per row, the k-th pair's chosen
    side as document 2k and its rejected side as 2k + 1, each shifted for next-token loss, labelled on the
    answer only."""
    rows = []
    for first in range(0, len(pairs), per_row):
        ids, labels, positions, documents = [], [], [], []
        for pair, (prompt, *answers) in enumerate(pairs[first : first + per_row]):
            for side, answer in enumerate(answers):
                tokens = prompt + answer
                targets = [IGNORE_INDEX] * len(prompt) + answer
                ids += tokens[:-1]
                labels += targets[1:]
                positions += list(range(len(tokens) - 1))
                documents += [2 * pair + side] * (len(tokens) - 1)
        rows.append((ids, labels, positions, documents))
    width = max(len(row[0]) for row in rows)
    pads = (0, IGNORE_INDEX, 0, -1)
    batch = [torch.tensor([row[k] + [pads[k]] * (width - len(row[k])) for row in rows]) for k in range(4)]
    return dict(zip(("input_ids", "labels", "position_ids", "document_ids"), batch))


def our_terms(policy: Mistral, reference, config: ObjectiveConfig, pairs, per_row: int = 1):
    batch = pair_rows(pairs, per_row)
    inputs = (batch["input_ids"], batch["labels"], batch["position_ids"])
    documents = batch["document_ids"]
    with torch.no_grad():
        reference_tokens = reference(*inputs, document_ids=documents)
    policy_tokens = policy.token_log_probs(*inputs, document_ids=documents, chunk_size=5)
    answer_tokens = pair_sums((batch["labels"] != IGNORE_INDEX).float(), documents)
    policy_sums = pair_sums(policy_tokens, documents)
    terms = preference_losses(config, policy_sums, pair_sums(reference_tokens, documents), answer_tokens)
    return terms, policy_sums


def trl_trainer(model, ref_model, tmp_path, beta: float, loss_type: str = "sigmoid"):
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w2")
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(PAIRS),
    )
    # The dataset only satisfies the constructor: the batches below are TRL's collator over our token ids.
    dataset = Dataset.from_dict({"prompt": ["w5 w6"], "chosen": ["w7"], "rejected": ["w8"]})
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.model.train()  # TRL files its metrics under "train" only for a model in training mode
    return trainer


def trl_loss(trainer, pairs) -> torch.Tensor:
    examples = [
        {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        for prompt, chosen, rejected in pairs
    ]
    return trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)


def trl_per_pair(trainer) -> list[dict[str, float]]:
    """TRL's loss and logged rewards/log-probabilities of each pair alone."""
    results = []
    for pair in PAIRS:
        loss = trl_loss(trainer, [pair])
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
        results.append({"loss": loss.item(), **metrics})
    return results


def per_pair(values: torch.Tensor, present: torch.Tensor) -> list[float]:
    """A batch's per-slot values as a list over its pairs, row by row."""
    return values[present].tolist()


def assert_pairs_equal(terms, policy_sums, reference_per_pair) -> None:
    assert int(terms.present.sum()) == len(reference_per_pair)
    ours = {
        "loss": per_pair(terms.losses, terms.present),
        "rewards/chosen": per_pair(terms.chosen_rewards, terms.present),
        "rewards/rejected": per_pair(terms.rejected_rewards, terms.present),
        "logps/chosen": per_pair(policy_sums.chosen, terms.present),
        "logps/rejected": per_pair(policy_sums.rejected, terms.present),
    }
    for index, theirs in enumerate(reference_per_pair):
        for name, values in ours.items():
            assert values[index] == pytest.approx(theirs[name], abs=1e-5), name


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our reference and policy, and their HF folders (fp32)."""
    reference = tiny_model()
    policy = perturbed(reference)
    folders = {
        name: model.save_pretrained(tmp_path_factory.mktemp(name), dtype=torch.float32)
        for name, model in (("reference", reference), ("policy", policy))
    }
    return reference, policy, folders


def hf_model(folder):
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def test_full_fine_tuning_equals_trl(models, tmp_path):
    reference, policy, folders = models
    config = ObjectiveConfig(kind="dpo", beta=0.1)
    trainer = trl_trainer(hf_model(folders["policy"]), hf_model(folders["reference"]), tmp_path, config.beta)
    theirs = trl_per_pair(trainer)
    ours = copy.deepcopy(policy).train()
    terms, sums = our_terms(ours, reference.token_log_probs, config, PAIRS)
    assert_pairs_equal(terms, sums, theirs)
    # DPO moved nothing yet: the pairs must tell the models apart, or the comparison shows nothing.
    assert min(abs(pair["rewards/chosen"] - pair["rewards/rejected"]) for pair in theirs) > 1e-3

    trl_loss(trainer, PAIRS).backward()
    (terms.losses.sum() / terms.present.sum()).backward()
    their_grads = {name: p.grad for name, p in trainer.model.named_parameters()}
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_grads[to_hf_name(name)], atol=1e-5, rtol=1e-4)


def test_lora_equals_peft_and_trl_with_adapters_off_as_reference(models, tmp_path):
    from peft import PeftModel

    reference, _, folders = models
    config = ObjectiveConfig(kind="dpo", beta=0.2)
    ours = adapted(reference, LORA, seed=2)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folders["reference"]))
    peft_model = PeftModel.from_pretrained(
        hf_model(folders["reference"]), tmp_path / "adapter", is_trainable=True
    )
    trainer = trl_trainer(peft_model, None, tmp_path, config.beta)
    # Given trained adapters, TRL copies them as a "ref" adapter; without it (a fresh adapter) its reference is
    # the base with the adapters switched off, as ours is.
    trainer.model.delete_adapter("ref")
    assert trainer.ref_model is None

    theirs = trl_per_pair(trainer)

    def adapters_off(*inputs, **options):
        with adapters_disabled(ours):
            return ours.token_log_probs(*inputs, **options)

    ours.train()
    terms, sums = our_terms(ours, adapters_off, config, PAIRS)
    assert_pairs_equal(terms, sums, theirs)

    trl_loss(trainer, PAIRS).backward()
    (terms.losses.sum() / terms.present.sum()).backward()
    their_grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.requires_grad}
    adapter_grads = [(name, p.grad) for name, p in ours.named_parameters() if p.requires_grad]
    assert len(adapter_grads) == len(their_grads) > 0
    for name, grad in adapter_grads:
        layer, _, rest = name.rpartition(".lora_")
        peft_name = f"{peft_module_name(layer)}.lora_{rest.removesuffix('.weight')}.default.weight"
        torch.testing.assert_close(grad, their_grads[peft_name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", ["sigmoid-smoothed", "ipo"])
def test_label_smoothing_and_ipo_follow_their_formulas(models, tmp_path, loss):
    """From TRL's per-pair log-probabilities, by hand: conservative DPO's -(1-ε) log σ(βΔ) - ε log σ(-βΔ), and
    IPO's (Δ/len - 1/(2β))² with each log-ratio divided by its answer's length (TRL's own IPO is checked too)."""
    reference, policy, folders = models
    config = (
        ObjectiveConfig(kind="dpo", beta=0.1, label_smoothing=0.2)
        if loss == "sigmoid-smoothed"
        else ObjectiveConfig(kind="dpo", beta=0.1, loss="ipo")
    )
    trainer = trl_trainer(
        hf_model(folders["policy"]), hf_model(folders["reference"]), tmp_path, config.beta, config.loss
    )
    theirs = trl_per_pair(trainer)
    with torch.no_grad():
        terms, _ = our_terms(policy, reference.token_log_probs, config, PAIRS)
    for index, (pair, (_, chosen, rejected)) in enumerate(zip(theirs, PAIRS)):
        chosen_ratio, rejected_ratio = (
            pair["rewards/chosen"] / config.beta,
            pair["rewards/rejected"] / config.beta,
        )
        if config.loss == "ipo":
            delta = chosen_ratio / len(chosen) - rejected_ratio / len(rejected)
            expected = (delta - 1 / (2 * config.beta)) ** 2
            assert expected == pytest.approx(pair["loss"], rel=1e-6, abs=1e-5)  # TRL's IPO
        else:
            logit = torch.tensor(config.beta * (chosen_ratio - rejected_ratio), dtype=torch.float64)
            smoothing = config.label_smoothing
            expected = (-(1 - smoothing) * F.logsigmoid(logit) - smoothing * F.logsigmoid(-logit)).item()
        assert per_pair(terms.losses, terms.present)[index] == pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_packed_pairs_give_the_same_terms_as_one_pair_per_row(models):
    """Two pairs in one row (documents 0-3) and one pair per row give the same per-pair values."""
    reference, policy, _ = models
    config = ObjectiveConfig(kind="dpo", beta=0.1)
    packed = pair_rows(PAIRS, per_row=2)
    assert packed["document_ids"][0].amax() == 3 and len(packed["input_ids"]) == 2
    with torch.no_grad():
        separate_terms, _ = our_terms(policy, reference.token_log_probs, config, PAIRS)
        packed_terms, _ = our_terms(policy, reference.token_log_probs, config, PAIRS, per_row=2)
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(
            getattr(packed_terms, field)[packed_terms.present],
            getattr(separate_terms, field)[separate_terms.present],
            atol=1e-6,
            rtol=0,
        )
