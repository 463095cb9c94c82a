"""`mistral-lightning preprocess`: the options (ModelLink's preprocess_data.py spellings) and main(argv)."""

from __future__ import annotations

import argparse

from mistral_lightning.cli.options import DefaultsHelpFormatter
from mistral_lightning.data.preprocess.columns import parse_columns
from mistral_lightning.data.preprocess.config import PreprocessConfig
from mistral_lightning.data.preprocess.formats import AUTO
from mistral_lightning.data.preprocess.handlers import FORMATS, HANDLER_CLASSES
from mistral_lightning.data.preprocess.pipeline import preprocess
from mistral_lightning.data.preprocess.summary import format_summary
from mistral_lightning.outputs import user_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning preprocess",
        description="Tokenize parquet/jsonl/json/arrow data into Megatron indexed datasets (.bin/.idx).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        help="a .parquet/.jsonl/.json/.arrow file, a folder of them, a glob, or a Hugging Face datasets "
        "folder (save_to_disk, or a load_dataset cache folder), read offline with pyarrow",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="the split of a datasets folder to read (default: train)",
    )
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument(
        "--tokenizer-model",
        type=user_path,
        help="a tokenizer file (tokenizer.model[.vN], tekken*.json, tokenizer.json) or an HF model folder; "
        "a folder's Mistral files come first (tekken.json, tokenizer.model.vN, tokenizer.model), then "
        "tokenizer.json",
    )
    tokenizer.add_argument(
        "--tokenizer-name-or-path", dest="tokenizer_model", type=user_path, help="same as --tokenizer-model"
    )
    parser.add_argument(
        "--tokenizer-type",
        choices=("PretrainedFromHF", "SentencePieceTokenizer"),
        default="PretrainedFromHF",
        help="PretrainedFromHF: any tokenizer file or HF folder; SentencePieceTokenizer: as "
        "--tokenizer-not-use-fast",
    )
    parser.add_argument(
        "--tokenizer-not-use-fast",
        action="store_true",
        help="never read an HF tokenizer.json (the fast tokenizer), only Mistral's sentencepiece or tekken "
        "files, as the recipe's slow tokenizer does",
    )
    parser.add_argument(
        "--output-prefix",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,
        help="writes <prefix>_<key>_document (pretrain) or <prefix>_packed_{input_ids,"
        "attention_mask,labels}_document (instruction) or <prefix>_packed_{chosen,rejected}_{input_ids,labels}"
        "_document (preference) .bin/.idx",
    )
    parser.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="text columns for GeneralPretrainHandler, one dataset each",
    )
    handler = parser.add_mutually_exclusive_group()
    handler.add_argument(
        "--handler",
        choices=(AUTO, *FORMATS),
        default=None,
        help="the data format: text (pretraining; --json-keys columns), alpaca (ModelLink's Alpaca template "
        "over instruction/input/output), messages (OpenAI 'messages': list of {role, content}), sharegpt "
        "('conversations': list of {from, value}, from human/gpt/system), prompt-completion (plain text, "
        "loss on the completion and EOS), preference (DPO pairs: 'prompt' text or messages, or 'messages', with "
        "'chosen' and 'rejected' text or one assistant message; or 'chosen' and 'rejected' conversations sharing "
        "all but their answer); chats use the tokenizer's Mistral chat format; auto: chosen by the first file's "
        "columns (default: text)",
    )
    handler.add_argument(
        "--handler-name",
        choices=tuple(HANDLER_CLASSES),
        default=None,
        help="the same as --handler, spelled as ModelLink recipes do: "
        + ", ".join(f"{name} = {cls.name}" for name, cls in HANDLER_CLASSES.items())
        + "; MistralInstructionHandler also reads instruction/input/output as a one-turn chat",
    )
    parser.add_argument(
        "--columns",
        default=None,
        help="your column names for the format's, as TARGET=SOURCE pairs: e.g. instruction=question,"
        "output=answer or conversations=dialog,from=speaker,value=text",
    )
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="append EOS to every document/sample (the Mistral template always ends answers with EOS)",
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="rows whose token count exceeds this are handled per --overlong and counted in the "
        "summary (default: no limit; pretraining packing cuts documents anyway)",
    )
    parser.add_argument(
        "--overlong",
        choices=("skip", "truncate"),
        default="skip",
        help="skip drops rows longer than --seq-length; truncate keeps their first --seq-length tokens (a "
        "preference side keeps its whole prompt and cuts its answer; a prompt alone that long is skipped)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes; the output is byte-identical for any value",
    )
    parser.add_argument("--log-interval", type=int, default=100, help="rows between progress reports")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        input=args.input,
        tokenizer_model=args.tokenizer_model,
        output_prefix=args.output_prefix,
        use_fast=not (args.tokenizer_not_use_fast or args.tokenizer_type == "SentencePieceTokenizer"),
        handler_name=FORMATS.get(args.handler, args.handler) or args.handler_name or "GeneralPretrainHandler",
        columns=parse_columns(args.columns),
        split=args.split,
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        seq_length=args.seq_length,
        overlong=args.overlong,
        workers=args.workers,
        log_interval=args.log_interval,
    )
    print(format_summary(preprocess(config)))
    return 0
