"""Check a dialog file and show it rendered: ``python -m gpt.chat FILE [tokenizer=RUN] [show=N]``
(or ``gpt check-dialogs FILE``). Every problem is listed with its file and line; with a tokenizer,
the first ``show`` dialogs are printed as the model sees them, the trained tokens in [brackets].

    python -m gpt.chat data/chat/demo.jsonl
    python -m gpt.chat my_dialogs.txt separator=--- tokenizer=out/chat show=3
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from gpt.chat_template import render_dialog
from gpt.cli import Command, main
from gpt.data.dialogs import read_dialogs
from gpt.tokenizer import load_tokenizer

COMMAND = Command(
    "check_dialogs",
    usage="python -m gpt.chat FILE [separator=LINE] [tokenizer=RUN_DIR] [show=N]",
    positional=("path",),
    free_text=("path", "separator", "tokenizer"),
)


def job(cfg: dict[str, Any]) -> None:
    dialogs, _ = read_dialogs(cfg["path"], cfg["separator"])
    print(f"{len(dialogs)} dialogs, {sum(len(d.messages) for d in dialogs)} messages: all valid")
    if not cfg["tokenizer"]:
        return
    tok = load_tokenizer(cfg["tokenizer"])
    for d in dialogs[: int(cfg["show"])]:
        ids, mask = render_dialog(tok, d.messages)
        print(f"--- {d.source}: {len(ids)} tokens, {sum(mask)} trained")
        for trained, group in itertools.groupby(zip(ids, mask, strict=True), key=lambda im: im[1]):
            text = tok.decode([i for i, _ in group])
            print(f"[{text}]" if trained else text, end="")
        print()


def run(argv: Sequence[str] | None = None) -> None:
    main(job, COMMAND, argv)


if __name__ == "__main__":
    run()
