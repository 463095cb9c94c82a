"""Preference pairs (DPO data): `preprocess --handler preference` against mistral-common's own encoding of each
side for v1, v3, v7 and tekken, its skipped and cut rows, PreferenceDataset's rows against the indexed data read
by hand, PreferenceDataModule's batches, and `demo-data`'s preference parquet against the tasks solved by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.tokenizer_references import CONVERSATION, SHIPPED, finetuning_ids, last_answer_labels, reference
from helpers.training import fake_trainer

from mistral_lightning.cli.preprocess import main
from mistral_lightning.data.contract import data_holds_preference_pairs
from mistral_lightning.data.datamodules import InstructionDataModule, PreferenceDataModule
from mistral_lightning.data.datasets import PreferenceDataset
from mistral_lightning.data.indexed import IndexedDataset, IndexedDatasetWriter
from mistral_lightning.errors import UserError

KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
PROMPT = CONVERSATION[:-1]  # a system message, an earlier answer, and the last user turn
SYSTEM_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b"}]


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# (row, prompt conversation, chosen answer, rejected answer): each of the forms the handler reads.
FORMS = {
    "string prompt": (
        {"prompt": "Reverse the words: red cat", "chosen": "cat red", "rejected": "red cat"},
        [{"role": "user", "content": "Reverse the words: red cat"}],
        "cat red",
        "red cat",
    ),
    "messages prompt": (
        {"prompt": PROMPT, "chosen": [_assistant("狗")], "rejected": [_assistant("Dog 🐕, in English")]},
        PROMPT,
        "狗",
        "Dog 🐕, in English",
    ),
    "messages column": (
        {"messages": SYSTEM_PROMPT, "chosen": "b a", "rejected": [_assistant("a b")]},
        SYSTEM_PROMPT,
        "b a",
        "a b",
    ),
    "implicit prompt": (
        {"chosen": [*PROMPT, _assistant("Gou.")], "rejected": [*PROMPT, _assistant("Chien.")]},
        PROMPT,
        "Gou.",
        "Chien.",
    ),
    # UltraFeedback's layout: whole conversations, and a `prompt` column repeating the user turn (not read).
    "implicit prompt beside a prompt column": (
        {
            "prompt": "Name a colour.",
            "chosen": [{"role": "user", "content": "Name a colour."}, _assistant("Blue.")],
            "rejected": [{"role": "user", "content": "Name a colour."}, _assistant("Seven.")],
        },
        [{"role": "user", "content": "Name a colour."}],
        "Blue.",
        "Seven.",
    ),
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _preprocess(tokenizer, rows: list[dict], prefix: Path, *extra: str) -> Path:
    data = _write_jsonl(prefix.parent / f"{prefix.name}.jsonl", rows)
    assert (
        main(
            [
                "--input",
                str(data),
                "--tokenizer-model",
                str(tokenizer),
                "--output-prefix",
                str(prefix),
                *extra,
            ]
        )
        == 0
    )
    return prefix


def _read(prefix: Path) -> dict[str, list[list[int]]]:
    """The four datasets, read back with our reader, as lists."""
    out = {}
    for key in KEYS:
        dataset = IndexedDataset(f"{prefix}_packed_{key}_document")
        out[key] = [dataset[i].tolist() for i in range(len(dataset))]
    return out


@pytest.fixture(scope="module")
def forms_preprocessed(tmp_path_factory):
    """Every form, preprocessed with --handler auto by a shipped tokenizer (once per tokenizer and module)."""
    done = {}

    def preprocess(name: str) -> tuple[str, Path, dict[str, list[list[int]]]]:
        if name not in done:
            prefix = tmp_path_factory.mktemp(f"pairs_{name}") / "pairs"
            _preprocess(SHIPPED[name], [row for row, *_ in FORMS.values()], prefix, "--handler", "auto")
            done[name] = name, prefix, _read(prefix)
        return done[name]

    return preprocess


@pytest.fixture(scope="module", params=["v1", "v3", "v7", "tekken"])
def preprocessed(request, forms_preprocessed):
    return forms_preprocessed(request.param)


@pytest.fixture(scope="module")
def v1_preprocessed(forms_preprocessed):
    return forms_preprocessed("v1")


def test_each_side_is_mistral_commons_encoding_labelled_on_its_last_answer(preprocessed):
    name, _, data = preprocessed
    assert all(len(data[key]) == len(FORMS) for key in KEYS)
    for row, (_, prompt, chosen, rejected) in enumerate(FORMS.values()):
        prompts = []
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = data[f"{side}_input_ids"][row], data[f"{side}_labels"][row]
            assert ids == finetuning_ids(name, [*prompt, _assistant(answer)]), (row, side)
            assert labels == last_answer_labels(name, ids), (row, side)
            assert sum(label != -100 for label in labels) < len(ids)
            prompts.append(ids[: next(i for i, label in enumerate(labels) if label != -100)])
        assert prompts[0] == prompts[1] and len(prompts[0]) > 0  # the prompt's ids, identical on both sides


def test_only_the_last_answer_is_labelled_in_a_multi_turn_prompt(preprocessed):
    name, _, data = preprocessed
    row = list(FORMS).index("messages prompt")
    eos = reference(name).instruct_tokenizer.tokenizer.eos_id
    for side in ("chosen", "rejected"):
        ids, labels = data[f"{side}_input_ids"][row], data[f"{side}_labels"][row]
        assert ids.count(eos) == 2 and labels.count(eos) == 1 and labels[-1] == eos


def test_columns_can_be_renamed_and_auto_detection_follows(v1_preprocessed, tmp_path, capsys):
    name, _, data = v1_preprocessed
    row, *_ = FORMS["string prompt"]
    renamed = [{"question": row["prompt"], "good": row["chosen"], "bad": row["rejected"]}]
    prefix = _preprocess(
        SHIPPED[name],
        renamed,
        tmp_path / "renamed",
        "--handler",
        "auto",
        "--columns",
        "prompt=question,chosen=good,rejected=bad",
    )
    assert _read(prefix) == {key: values[:1] for key, values in data.items()}
    assert (
        "format:            preference pairs (--handler auto, from the columns of" in capsys.readouterr().out
    )


def test_the_format_is_listed_in_preprocess_help():
    from mistral_lightning.cli.preprocess import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "PreferencePairwiseHandler = preference" in text and "preference (DPO pairs: 'prompt'" in text


def test_bad_rows_are_skipped_counted_and_named(tmp_path, capsys):
    good = {"prompt": "Reverse: red cat", "chosen": "cat red", "rejected": "red cat"}
    user, answer = {"role": "user", "content": "q"}, _assistant("a")
    bad = {
        "null or missing field": {"prompt": "q", "chosen": None, "rejected": "a"},
        "unrecognised format": {"prompt": "q", "rejected": "a"},
        "empty text": {"prompt": "q", "chosen": "  ", "rejected": "a"},
        "identical answers": {"prompt": "q", "chosen": "same", "rejected": "same"},
        "non-text field": {"prompt": "q", "chosen": 5, "rejected": "a"},
        "invalid answer": {"prompt": "q", "chosen": [user], "rejected": "a"},
        "conversations do not share a prompt": {
            "chosen": [user, answer],
            "rejected": [{"role": "user", "content": "other"}, _assistant("b")],
        },
        "invalid conversation": {"prompt": [user, answer], "chosen": "b", "rejected": "c"},
    }
    rows = [good, *bad.values(), {**good, "chosen": "CAT RED"}]
    prefix = _preprocess(SHIPPED["v1"], rows, tmp_path / "mixed", "--handler", "preference")
    summary = capsys.readouterr().out
    assert f"rows read:         {len(rows)}" in summary and "documents written: 2" in summary
    assert f"skipped rows:      {len(bad)} (" in summary
    for kind in bad:
        assert f"{kind}: 1" in summary, kind
    data = prefix.parent / "mixed.jsonl"
    assert f"{data} row 2: null or missing field (chosen)" in summary
    assert f"{data} row 3: unrecognised format (expected preference pairs (" in summary
    written = _read(prefix)
    assert len(written["chosen_input_ids"]) == 2
    assert written["chosen_input_ids"][0] == finetuning_ids(
        "v1", [{"role": "user", "content": good["prompt"]}, _assistant("cat red")]
    )
    assert written["chosen_input_ids"][1] == finetuning_ids(
        "v1", [{"role": "user", "content": good["prompt"]}, _assistant("CAT RED")]
    )


LIMIT = 20


@pytest.mark.parametrize("overlong", ["skip", "truncate"])
def test_overlong_sides_are_skipped_or_their_answer_cut(tmp_path, capsys, overlong):
    short_prompt = [{"role": "user", "content": "Repeat: cat"}]
    long_prompt = [{"role": "user", "content": "Repeat: " + "cat " * 30}]
    long_answer = "cat " * 30
    rows = [
        {"prompt": short_prompt[0]["content"], "chosen": "cat", "rejected": "dog"},
        {"prompt": short_prompt[0]["content"], "chosen": long_answer, "rejected": "dog"},
        {"prompt": long_prompt[0]["content"], "chosen": "cat", "rejected": "dog"},
    ]
    prompt_ids = finetuning_ids("v1", [*short_prompt, _assistant("cat")])
    long_ids = finetuning_ids("v1", [*short_prompt, _assistant(long_answer)])
    assert len(prompt_ids) <= LIMIT < len(long_ids)
    assert len(finetuning_ids("v1", [*long_prompt, _assistant("cat")])) > LIMIT + 10
    prefix = _preprocess(
        SHIPPED["v1"],
        rows,
        tmp_path / overlong,
        "--handler",
        "preference",
        "--seq-length",
        str(LIMIT),
        "--overlong",
        overlong,
    )
    summary = capsys.readouterr().out
    assert "prompt alone over --seq-length: 1" in summary  # in both modes
    data = _read(prefix)
    if overlong == "skip":
        assert "longer than --seq-length: 1" in summary and "truncated rows:    0" in summary
        assert len(data["chosen_input_ids"]) == 1
        return
    assert "truncated rows:    1" in summary and len(data["chosen_input_ids"]) == 2
    labels = last_answer_labels("v1", long_ids)
    assert data["chosen_input_ids"][1] == long_ids[:LIMIT] and data["chosen_labels"][1] == labels[:LIMIT]
    assert -100 in labels[:LIMIT] and labels[LIMIT - 1] != -100  # the prompt kept whole, the answer cut
    rejected = finetuning_ids("v1", [*short_prompt, _assistant("dog")])
    assert data["rejected_input_ids"][1] == rejected  # the other side is cut on its own, here not at all


# ------------------------------------------------------------------------ PreferenceDataset


def _write_pairs(prefix: Path, chosen: list[int], rejected: list[int], prompts: list[int]) -> str:
    """Pair k's side s (0 chosen, 1 rejected) holds tokens 1000 * (2k + s) + 1, +2, ...; its first prompts[k]
    labels are -100 and the rest its tokens. Returns the data prefix."""
    writers = {
        key: IndexedDatasetWriter(
            f"{prefix}_packed_{key}_document", np.int32 if "labels" in key else np.uint16
        )
        for key in KEYS
    }
    for k, lengths in enumerate(zip(chosen, rejected)):
        for s, (side, length) in enumerate(zip(("chosen", "rejected"), lengths)):
            tokens = 1000 * (2 * k + s) + 1 + np.arange(length)
            writers[f"{side}_input_ids"].add_document(tokens)
            writers[f"{side}_labels"].add_document(np.where(np.arange(length) < prompts[k], -100, tokens))
    for writer in writers.values():
        writer.finalize()
    return str(prefix)


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(3)
    chosen, rejected = rng.integers(3, 16, size=12), rng.integers(3, 16, size=12)
    prompts = rng.integers(1, 3, size=12)
    return _write_pairs(tmp_path / "prefs", chosen, rejected, prompts), chosen, rejected


def _sides(
    prefix: str,
) -> tuple[tuple[IndexedDataset, IndexedDataset], tuple[IndexedDataset, IndexedDataset]]:
    chosen, chosen_labels, rejected, rejected_labels = (
        IndexedDataset(f"{prefix}_packed_{key}_document") for key in KEYS
    )
    return (chosen, chosen_labels), (rejected, rejected_labels)


def _check_item(item: dict, prefix: str, seq_length: int) -> list[int]:
    """Document 2j is the chosen side and 2j + 1 the rejected side of the same pair, each as stored (shifted);
    returns the pairs of the item in order."""
    item = {key: value.numpy() for key, value in item.items()}
    assert len(item["input_ids"]) <= seq_length
    documents = item["document_ids"]
    assert documents[0] == 0 and set(np.diff(documents)) <= {0, 1} and documents[-1] % 2 == 1
    (chosen, chosen_labels), (rejected, rejected_labels) = _sides(prefix)
    found = []
    for document in range(int(documents[-1]) + 1):
        where = documents == document
        pair, side = divmod(int(item["input_ids"][where][0]) // 1000, 2)
        assert side == document % 2
        if side == 0:
            found.append(pair)
        assert pair == found[-1]  # the rejected side follows its own chosen side
        ids, labels = (chosen, chosen_labels) if side == 0 else (rejected, rejected_labels)
        assert item["input_ids"][where].tolist() == ids[pair].tolist()[:-1]
        assert item["labels"][where].tolist() == labels[pair].tolist()[1:]
        assert item["position_ids"][where].tolist() == list(range(int(where.sum())))
    return found


@pytest.mark.parametrize("pack", [False, True])
def test_rows_hold_whole_pairs_chosen_then_rejected(pairs, pack):
    prefix, chosen, rejected = pairs
    dataset = PreferenceDataset(*_sides(prefix), range(12), seq_length=40, seed=0, pack=pack)
    seen = []
    for index in range(len(dataset)):
        found = _check_item(dataset[index], prefix, 40)
        assert len(found) == 1 or pack
        seen += found
    assert sorted(seen) == list(range(12))
    assert (len(dataset) < 12) == pack
    if pack:  # greedy: a row ends only where the next pair would not fit
        for row in range(len(dataset) - 1):
            used = len(dataset[row]["input_ids"])
            following = int(dataset[row + 1]["input_ids"][0]) // 2000
            assert used + chosen[following] - 1 + rejected[following] - 1 > 40


def test_a_pair_longer_than_seq_length_is_refused_in_one_line(pairs):
    prefix, chosen, rejected = pairs
    need = chosen - 1 + rejected - 1
    seq_length = int(np.sort(need)[-3]) - 1  # three pairs or more do not fit
    first = int(np.flatnonzero(need > seq_length)[0])
    with pytest.raises(UserError) as error:
        PreferenceDataset(*_sides(prefix), range(12), seq_length=seq_length, seed=0)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{prefix}: ")
    assert (
        f"pair {first}: its chosen side has {chosen[first]} tokens and its rejected side {rejected[first]}"
        in message
    )
    assert f"at least {int(need.max())}" in message and f"--seq-length at most {seq_length // 2}" in message


# ------------------------------------------------------------------------ PreferenceDataModule


def test_the_datamodule_batches_pairs_from_preprocessed_data(v1_preprocessed):
    _, prefix, data = v1_preprocessed
    full_name = f"{prefix}_packed_chosen_input_ids_document"
    datamodule = PreferenceDataModule(full_name, seq_length=256, micro_batch_size=2, split="1", num_workers=0)
    assert datamodule.data_prefix == str(prefix)
    trainer = fake_trainer(vocab_size=32000)
    datamodule.trainer, trainer.datamodule = trainer, datamodule
    datamodule.setup("fit")
    assert data_holds_preference_pairs(trainer) is True and InstructionDataModule.preference_pairs is False
    assert sorted(Path(indexed.prefix).name for indexed, _ in datamodule.token_datasets()) == sorted(
        f"pairs_packed_{key}_document" for key in KEYS
    )
    seen = []
    for batch in datamodule.train_dataloader():
        assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] % 8 == 0
        for row in range(2):
            documents = batch["document_ids"][row]
            assert set(documents.tolist()) - {-1} == {0, 1}  # one pair per row, then padding
            chosen, rejected = (batch["input_ids"][row][documents == d].tolist() for d in (0, 1))
            pair = next(k for k, ids in enumerate(data["chosen_input_ids"]) if ids[:-1] == chosen)
            assert rejected == data["rejected_input_ids"][pair][:-1]
            for side, document in (("chosen", 0), ("rejected", 1)):
                labels = batch["labels"][row][documents == document].tolist()
                assert labels == data[f"{side}_labels"][pair][1:]
            assert (batch["labels"][row][documents == -1] == -100).all()
            seen.append(pair)
    assert len(set(seen)) == len(seen) == len(FORMS) // 2 * 2  # an incomplete last batch is dropped


def test_datasets_of_different_runs_are_refused_in_one_line(tmp_path):
    prefix = _write_pairs(tmp_path / "a", [5, 6, 7], [5, 6, 7], [1, 1, 1])
    other = _write_pairs(tmp_path / "b", [5, 6], [5, 9], [1, 1])

    def take_rejected_labels_of_other(prefix: str) -> None:
        for extension in (".bin", ".idx"):
            Path(f"{prefix}_packed_rejected_labels_document{extension}").write_bytes(
                Path(f"{other}_packed_rejected_labels_document{extension}").read_bytes()
            )

    take_rejected_labels_of_other(prefix)  # from a run with one pair fewer
    with pytest.raises(
        UserError, match=r"rejected_labels 2\); they come from different preprocess runs"
    ) as error:
        PreferenceDataModule(prefix, seq_length=64, num_workers=0).build_datasets()
    assert "\n" not in str(error.value)

    prefix = _write_pairs(tmp_path / "c", [5, 6], [5, 6], [1, 1])
    take_rejected_labels_of_other(prefix)  # as many pairs, other lengths
    with pytest.raises(
        UserError, match=r"the rejected input ids and labels disagree on the length of pair 1;"
    ):
        PreferenceDataModule(prefix, seq_length=64, num_workers=0).build_datasets()


# ------------------------------------------------------------------------ demo-data


def _solve(prompt: str) -> str:
    """The demo's word tasks, solved by hand."""
    instruction, words = prompt.split("\n")
    return {
        "Reverse the order of the words.": " ".join(reversed(words.split())),
        "Write the words in capital letters.": words.upper(),
        "Repeat the words twice.": f"{words} {words}",
        "How many words are there?": str(len(words.split())),
    }[instruction]


def test_demo_data_writes_preference_pairs_deterministically(tmp_path):
    from mistral_lightning.cli.demo_data import main as demo_main
    from mistral_lightning.demo.data import write_demo_data

    sizes = ["--train-rows", "5", "--heldout-rows", "5", "--mmlu-test-per-subject", "1"]
    assert (
        demo_main(
            [
                "--out",
                str(tmp_path / "a"),
                *sizes,
                "--preference-rows",
                "120",
                "--preference-heldout-rows",
                "40",
            ]
        )
        == 0
    )
    paths = write_demo_data(tmp_path / "b", 5, 5, 1, preference_rows=120, preference_heldout_rows=40)
    for path in (paths.preference_train, paths.preference_heldout):
        assert (tmp_path / "a" / path.relative_to(tmp_path / "b")).read_bytes() == path.read_bytes()
    train, heldout = (
        pq.read_table(p).to_pylist() for p in (paths.preference_train, paths.preference_heldout)
    )
    assert len(train) == 120 and len(heldout) == 40 and list(train[0]) == ["prompt", "chosen", "rejected"]
    for row in train + heldout:
        assert row["chosen"] == _solve(row["prompt"]) != row["rejected"]
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in heldout}
    # Each rejected answer is a near miss: the words as given, reversed, the first in capitals, a count too high.
    for row in train + heldout:
        words = row["prompt"].split("\n")[1].split()
        assert row["rejected"] in {
            " ".join(words),
            " ".join(words[::-1]),
            words[0].upper(),
            str(len(words) + 1),
        }
