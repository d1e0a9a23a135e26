"""Prepare a corpus ahead of training: ``gpt prepare PATH [data.KEY=VALUE ...]``. The data keys are
train.py's (conf/data/), so the same keys give the same cache entry and the training run starts at once:

    gpt prepare data/tinyshakespeare/input.txt data.tokenizer=char
    gpt prepare my_corpus/ data.tokenizer=bpe data.vocab_size=8192
    gpt prepare data=shakespeare                      # a shipped preset as it is
    torchrun --standalone --nproc_per_node=8 -m gpt prepare fineweb/ data.tokenizer=gpt2   # 8 processes

Under ``torchrun`` the processes share the work (over a gloo process group) and give the same
cache entry as one process would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.commands.cli import Command, main
from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.errors import ConfigError
from gpt.ranks import Ranks
from gpt.typed_config import from_dict


@dataclass
class PrepareConfig:
    """``gpt prepare``: the data keys of train.py, and the one window length to check."""

    data: DataConfig = field(default_factory=DataConfig)
    block_size: int = 0
    """Check that both splits hold a window of block_size + 1 tokens (the run's model.block_size);
    0 = any block size (the cache does not depend on it)."""

    def __post_init__(self) -> None:
        if self.block_size < 0:
            raise ConfigError(f"block_size={self.block_size} must be >= 0 (0 = any)")


COMMAND = Command(
    "prepare",
    schema=PrepareConfig,
    usage="gpt prepare PATH [data.tokenizer=char|bpe|gpt2|hf] [data.KEY=VALUE ...]",
    positional=("data.path",),
    free_text=("data.path", "data.tokenizer_path", "data.cache_dir"),
)


def job(cfg: dict[str, Any], given: frozenset[str]) -> None:
    data = dict(cfg["data"])
    if "data.name" not in given and "data" not in given:  # the cache folder is named after the input
        data["name"] = Path(str(data["path"]).rstrip("/")).stem or "data"
    config = from_dict(PrepareConfig, {**cfg, "data": data})
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if joined:  # under torchrun: the CPU-only gloo group is all that preparation needs
        import torch.distributed as dist  # only then: one process does not pay torch's start-up memory

        dist.init_process_group("gloo")
    try:
        ranks = Ranks.current()
        prepared = prepare(config.data, config.block_size, show_progress=ranks.is_main, ranks=ranks)
        if ranks.is_main:
            print(f"prepared {prepared.directory}")
            print(f"  tokenizer {prepared.tokenizer.kind}, vocab_size {prepared.tokenizer.vocab_size}")
            print(f"  train: {prepared.train_tokens:,} tokens in {len(prepared.train_shards)} shard(s)")
            print(f"  val:   {prepared.val_tokens:,} tokens in {len(prepared.val_shards)} shard(s)")
    finally:
        if joined:
            dist.destroy_process_group()


def run(argv: Sequence[str] | None = None) -> None:
    main(job, COMMAND, argv)

