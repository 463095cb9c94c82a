"""Hugging Face `datasets` folders as --input: the arrow files of one split, found without `datasets` itself.

Three layouts: a DatasetDict saved with `save_to_disk` (dataset_dict.json and a folder per split), one
Dataset saved with `save_to_disk` (state.json lists its arrow files in order), and a `load_dataset` cache
folder (dataset_info.json beside `<builder>-<split>[-NNNNN-of-NNNNN].arrow`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mistral_lightning.data.preprocess.config import PreprocessError

DEFAULT_SPLIT = "train"
# `json-train.arrow`, `csv-test-00001-of-00004.arrow`; the cache's `cache-<fingerprint>.arrow` are map() results.
CACHED_SPLIT_FILE = re.compile(r"(?P<builder>.+?)-(?P<split>[^-]+)(?:-\d{5}-of-\d{5})?\.arrow")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PreprocessError(
            f"cannot read {path} ({error}); save the dataset again with save_to_disk"
        ) from error


def _pick_split(folder: Path, splits: list[str], split: str | None) -> str:
    chosen = split or DEFAULT_SPLIT
    if chosen not in splits:
        raise PreprocessError(
            f"--split {chosen}: the datasets folder {folder} has splits {', '.join(splits) or 'none'}; "
            "choose one with --split"
        )
    return chosen


def _saved_dataset_files(folder: Path, split: str | None) -> list[Path]:
    """The arrow files of one Dataset saved with save_to_disk, in their order."""
    state = _read_json(folder / "state.json")
    saved_split = state.get("_split")
    if split is not None and saved_split != split:
        holds = f"only split {saved_split}" if saved_split else "one dataset without splits"
        raise PreprocessError(
            f"--split {split}: the datasets folder {folder} holds {holds}; leave out --split"
        )
    files = [folder / entry["filename"] for entry in state.get("_data_files", [])]
    missing = [str(path) for path in files if not path.is_file()]
    if missing or not files:
        raise PreprocessError(
            f"{folder}/state.json lists arrow files that are missing ({', '.join(missing) or 'none listed'}); "
            "save the dataset again with save_to_disk"
        )
    return files


def _cached_split_files(folder: Path, split: str | None) -> list[Path] | None:
    """The arrow files of one split in a load_dataset cache folder; None when the folder has none."""
    by_split: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.arrow")):
        match = CACHED_SPLIT_FILE.fullmatch(path.name)
        if match and match["builder"] != "cache":
            by_split.setdefault(match["split"], []).append(path)
    if not by_split:
        return None
    return by_split[_pick_split(folder, list(by_split), split)]


def dataset_files(folder: Path, split: str | None) -> list[Path] | None:
    """The arrow files of `split` (train by default) if `folder` is a `datasets` folder, else None."""
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits", [])
        return _saved_dataset_files(folder / _pick_split(folder, splits, split), None)
    if (folder / "state.json").is_file():
        return _saved_dataset_files(folder, split)
    if (folder / "dataset_info.json").is_file():
        return _cached_split_files(folder, split)
    return None
