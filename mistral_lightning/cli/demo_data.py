"""`mistral-lightning demo-data`: the demo's synthetic data (mistral_lightning.demo.data) written to a folder."""

from __future__ import annotations

import argparse

from mistral_lightning.demo.data import write_demo_data
from mistral_lightning.outputs import user_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning demo-data",
        description="Write deterministic synthetic Alpaca-schema parquet (train + held-out), preference pairs "
        "(prompt, chosen, rejected parquet for DPO; train + held-out) and an MMLU-layout folder of multiple-choice "
        "questions; nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=user_path,
        required=True,
        default=argparse.SUPPRESS,  # required: no "(default: None)" in --help
        help="output folder (alpaca/{train,heldout}.parquet, preference/{train,heldout}.parquet, mmlu/{dev,test}/)",
    )
    parser.add_argument("--train-rows", type=int, default=4000, help="rows of alpaca/train.parquet")
    parser.add_argument("--heldout-rows", type=int, default=400, help="rows of alpaca/heldout.parquet")
    parser.add_argument(
        "--mmlu-test-per-subject", type=int, default=50, help="questions per subject in mmlu/test/"
    )
    parser.add_argument("--preference-rows", type=int, default=1000, help="rows of preference/train.parquet")
    parser.add_argument(
        "--preference-heldout-rows", type=int, default=200, help="rows of preference/heldout.parquet"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes every row and question")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = write_demo_data(
        args.out,
        args.train_rows,
        args.heldout_rows,
        args.mmlu_test_per_subject,
        args.seed,
        args.preference_rows,
        args.preference_heldout_rows,
    )
    print(f"wrote {paths.train}\nwrote {paths.heldout}\nwrote {paths.mmlu}/dev and {paths.mmlu}/test")
    print(f"wrote {paths.preference_train}\nwrote {paths.preference_heldout}")
    return 0
