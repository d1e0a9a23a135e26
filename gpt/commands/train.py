"""``python train.py`` (``gpt train``): how it reads its command line and what it runs; every key is
in conf/train.yaml, the loop is gpt.train.loop.

    python train.py data=text data.path=notes/ out_dir=out/notes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt.commands.cli import Command, main
from gpt.config import TrainRunConfig
from gpt.train.loop import train

# paths and text: verbatim (a path may hold '[' or ',', a separator any character)
TRAIN = Command(
    "train",
    usage="python train.py [key=value ...] (conf/train.yaml documents every key)",
    free_text=("out_dir", "init_from", "data.path", "data.separator", "data.tokenizer_path", "wandb.name"),
)


def train_job(cfg: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
    summary = train(TrainRunConfig.from_command_line(cfg, given))
    if summary.get("rank", 0) == 0 and summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f}, out_dir {cfg['out_dir']}")
    return summary



def train_main(argv: Sequence[str] | None = None) -> Any:
    return main(train_job, TRAIN, argv)
