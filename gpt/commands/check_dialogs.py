"""Check a dialog or preference-pair file and show it rendered: ``gpt check-dialogs FILE
[tokenizer=RUN] [show=N]``. The format detected per file is printed
(messages, sharegpt, alpaca, transcript; or pairs), with the counts; every problem is listed with its
file and line; with a tokenizer, the first ``show`` dialogs (or both replies of the first pairs)
are printed as the model sees them, the trained tokens in [brackets].

    gpt check-dialogs data/chat/demo.jsonl
    gpt check-dialogs my_dialogs.txt separator=--- tokenizer=out/chat show=3
    gpt check-dialogs data/chat/pairs.jsonl tokenizer=out/sft show=1
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpt.chat_template import render_dialog
from gpt.commands.cli import Command, main
from gpt.data.corpus import input_files
from gpt.data.dialogs import read_dialogs
from gpt.data.preference import read_pairs, render_pair
from gpt.errors import ConfigError
from gpt.tokenizer_load import load_tokenizer
from gpt.typed_config import from_dict


@dataclass
class CheckDialogsConfig:
    """``gpt check-dialogs``: the file to check and how to show it."""

    path: str
    """A .jsonl (messages, ShareGPT, Alpaca, pairs) or plain-text dialog file, a directory or a glob
    (the bare word on the command line)."""
    separator: str | None = None
    """Plain text: the line between dialogs (None = a blank line)."""
    tokenizer: str | None = None
    """A run directory or tokenizer.json to render with (None = check only)."""
    show: int = 1
    """Dialogs (or pairs) printed rendered when a tokenizer is given."""

    def __post_init__(self) -> None:
        if self.show < 0:
            raise ConfigError(f"show={self.show} must be >= 0")


COMMAND = Command(
    "check_dialogs",
    schema=CheckDialogsConfig,
    usage="gpt check-dialogs FILE [separator=LINE] [tokenizer=RUN_DIR] [show=N]",
    positional=("path",),
    free_text=("path", "separator", "tokenizer"),
)


def is_pairs_file(path: str) -> bool:
    """Whether the first record of the first JSONL file is a preference pair."""
    for file in input_files(path):
        if file.suffix.lower() != ".jsonl":
            return False
        with open(file, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        return False
                    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj
    return False


def show_rendered(tok, source: str, ids: list[int], mask: list[int]) -> None:
    print(f"--- {source}: {len(ids)} tokens, {sum(mask)} trained")
    for trained, group in itertools.groupby(zip(ids, mask, strict=True), key=lambda im: im[1]):
        text = tok.decode([i for i, _ in group])
        print(f"[{text}]" if trained else text, end="")
    print()


def job(plain: dict[str, Any]) -> None:
    cfg = from_dict(CheckDialogsConfig, plain)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if is_pairs_file(cfg.path):
        pairs, _ = read_pairs(cfg.path)
        print(f"format: pairs; {len(pairs)} preference pairs: all valid")
        for pair in pairs[: cfg.show] if tok else []:
            for name, (ids, mask) in zip(("chosen", "rejected"), render_pair(tok, pair, 10**9), strict=True):
                show_rendered(tok, f"{pair.source} {name}", ids, mask)
        return
    dialogs, _ = read_dialogs(cfg.path, cfg.separator)
    files = Counter(d.source.rsplit(":", 1)[0] for d in dialogs)
    for file, fmt in dict.fromkeys((d.source.rsplit(":", 1)[0], d.format) for d in dialogs):
        print(f"format: {fmt} ({file}, {files[file]} dialogs)")
    print(f"{len(dialogs)} dialogs, {sum(len(d.messages) for d in dialogs)} messages: all valid")
    for d in dialogs[: cfg.show] if tok else []:
        show_rendered(tok, d.source, *render_dialog(tok, d.messages))


def run(argv: Sequence[str] | None = None) -> None:
    main(job, COMMAND, argv)

