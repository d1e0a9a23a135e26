"""``python sample.py`` (``gpt sample``, ``gpt chat``): stream text, a prompt loop or a chat; every key
is in gpt.infer.config.SampleConfig (``python sample.py --help``), the library side is gpt.infer.

    python sample.py ckpt=out/notes 'prompt=Once upon a time, there was'
    gpt chat ckpt=out/chat
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt.commands.cli import Command, main
from gpt.infer.config import SampleConfig
from gpt.infer.sample import sample

# paths and text: verbatim (a path may hold '[' or ',', a separator any character)
SAMPLE = Command("sample", schema=SampleConfig, repeatable=("stop",),
                 usage="python sample.py [ckpt=DIR] [prompt=TEXT] [key=value ...] (--help lists every key)",
                 free_text=("prompt", "system", "stop", "ckpt", "prompt_file", "history_file"))


def sample_job(cfg: dict[str, Any], given: frozenset[str]) -> None:
    sample(cfg)


def sample_main(argv: Sequence[str] | None = None) -> Any:
    return main(sample_job, SAMPLE, argv)
