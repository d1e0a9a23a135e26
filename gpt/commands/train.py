"""``python train.py`` (``gpt train``): how it reads its command line and what it runs; every key is
in gpt.config.TrainRunConfig (``python train.py --help``), the loop is gpt.train.loop.

    python train.py data=text data.path=notes/ out_dir=out/notes
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from gpt.commands.cli import Command, main
from gpt.config import TrainRunConfig
from gpt.errors import DivergenceError
from gpt.train.dry_run import dry_run
from gpt.train.loop import train
from gpt.train.signals import Stop

# paths and text: verbatim (a path may hold '[' or ',', a separator any character)
TRAIN = Command(
    "train",
    schema=TrainRunConfig,
    usage="python train.py [key=value ...] (--help lists every key)",
    free_text=("out_dir", "init_from", "data.path", "data.separator", "data.tokenizer_path", "wandb.name"),
)

# the exit status of each way a run stops: a signal's is the shell's 128 + its number; a divergence is
# a UserError (one ``error:`` line, status 2)
EXIT_STATUS = {Stop.DONE: 0, Stop.REQUESTED: 0, Stop.SIGINT: 130, Stop.SIGTERM: 143}


def train_job(cfg: dict[str, Any], given: frozenset[str]) -> dict[str, Any]:
    config = TrainRunConfig.from_command_line(cfg, given)
    if config.train.dry_run:  # plan the job on this CPU: nothing trains, nothing is written
        print(dry_run(config))
        return {"dry_run": config.train.dry_run}
    summary = train(config)
    stopped = summary["stopped"]
    if stopped is Stop.DIVERGED:
        raise DivergenceError(summary["failure"])
    if stopped is Stop.DONE and summary["rank"] == 0 and summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f}, out_dir {config.out_dir}")
    if EXIT_STATUS[stopped]:
        sys.exit(EXIT_STATUS[stopped])
    return summary


def train_main(argv: Sequence[str] | None = None) -> Any:
    return main(train_job, TRAIN, argv)
