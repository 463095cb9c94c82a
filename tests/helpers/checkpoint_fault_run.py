"""One rank of `mistral-lightning fit` started as torchrun would, optionally with a full disk on this rank.

usage: checkpoint_fault_run.py FAULT ARGV..., where FAULT is "-" or "RANK:WHERE:CHECKPOINT": on rank RANK,
writing CHECKPOINT (e.g. step=4.ckpt) hits a full disk in its DCP data file (WHERE=data) or meta.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for `helpers`
from helpers.checkpoints import fill_disk_while_writing  # noqa: E402
from mistral_lightning.cli import main  # noqa: E402

if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault != "-":
        rank, where, checkpoint = fault.split(":")
        if int(os.environ["LOCAL_RANK"]) == int(rank):
            fill_disk_while_writing(where, checkpoint)
    torch.set_num_threads(1)
    sys.exit(main(argv))
