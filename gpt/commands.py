"""The jobs of ``train.py`` and ``sample.py`` (also ``gpt train`` / ``gpt sample`` / ``gpt chat``):
how each reads its command line (``gpt.cli.Command``) and what it runs.

    python train.py data=text data.path=notes/ out_dir=out/notes
    python sample.py ckpt=out/notes 'prompt=Once upon a time, there was'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt.cli import Command, main
from gpt.config import TrainRunConfig
from gpt.infer.sample import sample
from gpt.train.loop import train

# paths and text: verbatim (a path may hold '[' or ',', a separator any character)
TRAIN = Command(
    "train",
    usage="python train.py [key=value ...] (conf/train.yaml documents every key)",
    free_text=("out_dir", "init_from", "data.path", "data.separator", "data.tokenizer_path", "wandb.name"),
)
SAMPLE = Command(
    "sample",
    usage="python sample.py [ckpt=DIR] [prompt=TEXT] [key=value ...] (conf/sample.yaml documents every key)",
    free_text=("prompt", "system", "stop", "ckpt", "prompt_file", "history_file"),
    repeatable=("stop",),
)


def train_job(cfg: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
    summary = train(TrainRunConfig.from_command_line(cfg, given))
    if summary.get("rank", 0) == 0 and summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f}, out_dir {cfg['out_dir']}")
    return summary


def sample_job(cfg: dict[str, Any], given: frozenset[str]) -> None:
    sample(cfg)


def train_main(argv: Sequence[str] | None = None) -> Any:
    return main(train_job, TRAIN, argv)


def sample_main(argv: Sequence[str] | None = None) -> Any:
    return main(sample_job, SAMPLE, argv)
