"""Dialog files: reading and checking chat transcripts (the data side of instruction tuning).

    dialogs, skipped = read_dialogs("dialogs.jsonl")       # DataError lists every problem
    train, val = split_dialogs(dialogs, val_fraction=0.1)

Files: ``.jsonl`` holds one dialog per line, as OpenAI ``messages``, ShareGPT ``conversations`` or
Alpaca ``instruction``/``output`` (``gpt.data.formats``, detected per file); any other file is a plain-text
transcript whose turns start with ``User:`` / ``Assistant:`` (optionally ``System:`` first), dialogs
separated by a blank line or by a separator line (``data.separator``). Every problem is reported with
its file and line. Check a file with ``gpt check-dialogs FILE``; the rendering to tokens is
``gpt.chat_template``, the SFT batches ``gpt.data.sft``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.chat_template import check_messages
from gpt.data.corpus import input_files
from gpt.data.formats import EXPECTED, detect_format, to_messages
from gpt.errors import DataError

_TURN_LINE = re.compile(r"(System|User|Assistant):(.*)", re.S)
_ROLE_LIKE = re.compile(r"([A-Za-z][\w -]{0,30}):")  # "Bot: hi" at a dialog start: an unknown role
MAX_LISTED = 20  # problems listed in an error message


@dataclass
class Dialog:
    messages: list[dict[str, Any]]  # {"role", "content"} plus any extra keys of the input (e.g. "task")
    source: str  # "file:line" of its first line, for messages
    format: str = "transcript"  # the file's format: transcript or one of gpt.data.formats.FORMATS


def jsonl_records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(file:line, object, problem) of each non-blank line of a JSONL file (dialogs, preference
    pairs): the object is None when the line is not UTF-8 or not JSON, which the problem says."""
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    yield f"{path}:{ln}", json.loads(line), None
            except UnicodeDecodeError as e:
                yield f"{path}:{ln}", None, f"invalid UTF-8 at byte {e.start} of the line"
            except json.JSONDecodeError as e:
                yield f"{path}:{ln}", None, f"invalid JSON ({e.msg} at column {e.colno})"


def _jsonl_dialogs(path: Path, problems: list[str]) -> list[Dialog | None]:
    """One dialog per non-blank line, in the file's format (``gpt.data.formats``, detected from its
    first record); a bad line adds its problems and gives None."""
    out: list[Dialog | None] = []
    fmt: str | None = None
    for where, obj, problem in jsonl_records(path):
        fmt = fmt or (detect_format(obj) if problem is None else None)
        if problem is None and fmt is None:
            problem = ('missing "messages" (or ShareGPT "conversations", or Alpaca "instruction" and '
                       f'"output"); expected {EXPECTED["messages"]}')  # fmt: skip
        if problem is not None:
            problems.append(f"{where}: {problem}")
            out.append(None)
            continue
        messages, bad = to_messages(obj, fmt)
        problems += [f"{where}: {text}" for text in bad]
        found = check_messages(messages) if messages is not None else []
        problems += [f"{where}: message {i + 1}: {text}" for i, text in found]
        out.append(None if bad or found else Dialog(messages, where, fmt))
    return out


def _text_blocks(lines: list[str], separator: str | None) -> list[list[tuple[int, str]]]:
    """Group (line number, line) into dialogs: split at blank lines, or at separator lines only."""
    blocks: list[list[tuple[int, str]]] = [[]]
    for ln, line in enumerate(lines, 1):
        if (line.strip() == separator) if separator is not None else not line.strip():
            blocks.append([])
        else:
            blocks[-1].append((ln, line))
    return [b for b in blocks if any(line.strip() for _, line in b)]


def _text_dialogs(path: Path, separator: str | None, problems: list[str]) -> list[Dialog | None]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        problems.append(f"{path}:{line}: invalid UTF-8; convert the file to UTF-8")
        return [None]
    out: list[Dialog | None] = []
    for block in _text_blocks([s.rstrip("\r") for s in text.split("\n")], separator):
        while not block[0][1].strip():  # blank lines inside separator-delimited dialogs
            block.pop(0)
        messages, lines, bad = [], [], False
        for ln, line in block:
            m = _TURN_LINE.match(line)
            if m:
                messages.append({"role": m.group(1).lower(), "content": m.group(2)})
                lines.append(ln)
            elif messages:
                messages[-1]["content"] += "\n" + line  # a turn goes on until the next marker
            else:
                unknown = _ROLE_LIKE.match(line)
                what = f"unknown role {unknown.group(1)!r}" if unknown else f"unexpected text {line[:40]!r}"
                problems.append(f"{path}:{ln}: {what}; a dialog's lines start with System:, User: or "
                                "Assistant: (the first turn is User:, or System: then User:)")  # fmt: skip
                bad = True
                break
        if not bad:
            for m in messages:
                m["content"] = m["content"].strip()
            found = check_messages(messages)
            problems += [f"{path}:{lines[i]}: {text}" for i, text in found]
            bad = bool(found)
        out.append(None if bad else Dialog(messages, f"{path}:{block[0][0]}"))
    return out


def read_dialogs(path: str | Path, separator: str | None = None, skip_invalid: bool = False
                 ) -> tuple[list[Dialog], int]:  # fmt: skip
    """The valid dialogs of a file, directory or glob (see ``gpt.data.corpus.input_files``) and the count
    of skipped bad ones. Bad dialogs raise one DataError listing every problem with file and line,
    unless ``skip_invalid`` (then they are left out and counted)."""
    problems: list[str] = []
    parsed: list[Dialog | None] = []
    for file in input_files(path):
        if file.suffix.lower() == ".jsonl":
            parsed += _jsonl_dialogs(file, problems)
        else:
            parsed += _text_dialogs(file, separator, problems)
    dialogs = [d for d in parsed if d is not None]
    skipped = len(parsed) - len(dialogs)
    if problems and not skip_invalid:
        raise problems_error(f"{skipped} malformed dialog(s) in {path}", problems)
    if not dialogs:
        raise DataError(
            f"{path} holds no dialogs; the README's chat section describes the JSONL and plain-text formats"
        )
    return dialogs, skipped


def problems_error(what: str, problems: list[str]) -> DataError:
    """One error listing the problems (the first MAX_LISTED), each with its file and line."""
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    listed = "\n  ".join(problems[:MAX_LISTED])
    return DataError(f"{what}; fix them, or set data.skip_invalid=true to skip them:\n  {listed}{more}")


def split_dialogs(dialogs: list[Dialog], val_fraction: float) -> tuple[list[Dialog], list[Dialog]]:
    """(train, held out): the last ``val_fraction`` of the dialogs, in file order, are held out."""
    n_val = max(1, round(len(dialogs) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(dialogs):
        raise DataError(
            f"{len(dialogs)} dialog(s) leave none for training with data.val_fraction={val_fraction}; "
            "add dialogs or lower data.val_fraction"
        )
    return dialogs[: len(dialogs) - n_val], dialogs[len(dialogs) - n_val :]
