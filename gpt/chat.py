"""Dialogs: reading and checking chat transcripts, rendering them to tokens, and SFT batches.

This module is the only place where a dialog becomes tokens. A dialog is a list of messages
``{"role": "system" | "user" | "assistant", "content": str}``: an optional system message first, then
user and assistant turns alternating, ending with an assistant turn. It renders as

    <|endoftext|>System: Be brief.<|end_of_turn|>
    User: What is 12 + 30?<|end_of_turn|>
    Assistant: 42<|end_of_turn|>

where the two special tokens come from the renderer only (``Tokenizer.encode`` never produces them,
so a user who types ``<|end_of_turn|>`` or ``\\nAssistant:`` writes plain text inside the turn). The
loss mask covers exactly each assistant turn's content and its end-of-turn token.

    dialogs, skipped = read_dialogs("dialogs.jsonl")       # DataError lists every problem
    ids, loss_mask = render_dialog(tokenizer, dialogs[0].messages)
    prompt = render_prompt(tokenizer, history)              # ... + "\\nAssistant:", to generate a reply

Files: ``.jsonl`` holds one ``{"messages": [...]}`` per line; any other file is a plain-text
transcript whose turns start with ``User:`` / ``Assistant:`` (optionally ``System:`` first), dialogs
separated by a blank line or by a separator line (``data.separator``). Check a file with
``python -m gpt.chat FILE``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt.errors import DataError, UserError
from gpt.tokenizer import EOT_TURN, Tokenizer

if TYPE_CHECKING:
    import torch

    from gpt.config import DataConfig

ROLES = ("system", "user", "assistant")
MARKERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
_TURN_LINE = re.compile(r"(System|User|Assistant):(.*)", re.S)
_ROLE_LIKE = re.compile(r"([A-Za-z][\w -]{0,30}):")  # "Bot: hi" at a dialog start: an unknown role
MAX_LISTED = 20  # problems listed in an error message


@dataclass
class Dialog:
    messages: list[dict[str, Any]]  # {"role", "content"} plus any extra keys of the input (e.g. "task")
    source: str  # "file:line" of its first line, for messages


# ------------------------------------------------------------------------------------ checking
def check_messages(messages: Any) -> list[tuple[int, str]]:
    """Every problem of a dialog as (message index, text): roles, empty content, turn order."""
    if not isinstance(messages, list) or not messages:
        return [(0, '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects')]
    problems: list[tuple[int, str]] = []
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            problems.append((i, 'each message must be an object with "role" and "content"'))
            continue
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            problems.append((i, f"unknown role {role!r} (expected system, user or assistant)"))
        elif role == "system" and i > 0:
            problems.append((i, "a system message may only come first"))
        elif role != "system" and role != expected:
            article = "an" if expected == "assistant" else "a"
            problems.append((i, f"turns must alternate: expected {article} {expected} turn, got {role}"))
        if not isinstance(content, str):
            problems.append((i, '"content" must be a string'))
        elif not content.strip():
            problems.append((i, f"empty content in the {role} turn"))
        if role in ("user", "assistant"):
            expected = "assistant" if role == "user" else "user"
    last = messages[-1]
    if not problems and (not isinstance(last, dict) or last.get("role") != "assistant"):
        role = last.get("role") if isinstance(last, dict) else "?"
        problems.append((len(messages) - 1, f"the dialog ends with a {role} turn; it must end with an "
                                            "assistant reply"))  # fmt: skip
    return problems


def _jsonl_dialogs(path: Path, problems: list[str]) -> list[Dialog | None]:
    """One dialog per non-blank line; a bad line adds its problems and gives None."""
    out: list[Dialog | None] = []
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{where}: invalid UTF-8 at byte {e.start} of the line")
                out.append(None)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                out.append(None)
                continue
            if not isinstance(obj, dict) or "messages" not in obj:
                problems.append(f'{where}: missing "messages" (expected {{"messages": [{{"role": ..., '
                                f'"content": ...}}, ...]}})')  # fmt: skip
                out.append(None)
                continue
            found = check_messages(obj["messages"])
            problems += [f"{where}: message {i + 1}: {text}" for i, text in found]
            out.append(None if found else Dialog([dict(m) for m in obj["messages"]], where))
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


def read_dialogs(
    path: str | Path, separator: str | None = None, skip_invalid: bool = False
) -> tuple[list[Dialog], int]:
    """The valid dialogs of a file, directory or glob (see ``gpt.corpus.input_files``) and the count
    of skipped bad ones. Bad dialogs raise one DataError listing every problem with file and line,
    unless ``skip_invalid`` (then they are left out and counted)."""
    from gpt.corpus import input_files

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
        raise _problems(f"{skipped} malformed dialog(s) in {path}", problems)
    if not dialogs:
        raise DataError(f"{path} holds no dialogs; see gpt/chat.py for the JSONL and plain-text formats")
    return dialogs, skipped


def _problems(what: str, problems: list[str]) -> DataError:
    """One error listing the problems (the first MAX_LISTED), each with its file and line."""
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    listed = "\n  ".join(problems[:MAX_LISTED])
    return DataError(f"{what}; fix them, or set data.skip_invalid=true to skip them:\n  {listed}{more}")


def split_dialogs(dialogs: list[Dialog], val_fraction: float) -> tuple[list[Dialog], list[Dialog]]:
    """(train, held out): the last ``val_fraction`` of the dialogs, in file order, are held out."""
    n_val = round(len(dialogs) * val_fraction) if val_fraction > 0 else 0
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(dialogs):
        raise DataError(
            f"{len(dialogs)} dialog(s) leave none for training with data.val_fraction={val_fraction}; "
            "add dialogs or lower data.val_fraction"
        )
    return dialogs[: len(dialogs) - n_val], dialogs[len(dialogs) - n_val :]


# ----------------------------------------------------------------------------------- rendering
def _turn(tokenizer: Tokenizer, role: str, content: str, first: bool) -> tuple[list[int], list[int]]:
    """(marker ids, content ids + end-of-turn): the marker and the content are encoded separately,
    so no token ever spans both and a reply's tokens are the same whether trained or generated."""
    head = tokenizer.encode(MARKERS[role] if first else "\n" + MARKERS[role])
    return head, tokenizer.encode(" " + content.strip()) + [tokenizer.special_id(EOT_TURN)]


def render_turns(
    tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]
) -> tuple[list[int], list[int], list[int]]:
    """(ids, loss_mask, turn_ends): <|endoftext|>, then each turn as marker, content, end-of-turn;
    loss_mask[i] = 1 where ids[i] is an assistant's content or its end-of-turn; turn_ends[k] is
    len(ids) after turn k. A char tokenizer that lacks a character raises DataError naming it."""
    ids, mask, ends = [tokenizer.eot_id], [0], []
    for k, m in enumerate(messages):
        head, body = _turn(tokenizer, m["role"], m["content"], first=k == 0)
        ids += head + body
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
        ends.append(len(ids))
    return ids, mask, ends


def render_dialog(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole dialog: what SFT trains on."""
    ids, mask, _ = render_turns(tokenizer, messages)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The ids that precede the next assistant reply: the history (ending with a user turn) and the
    opening ``\\nAssistant:``; exactly the training rendering cut before the reply's content."""
    ids, _, _ = render_turns(tokenizer, messages)
    return ids + tokenizer.encode("\n" + MARKERS["assistant"] if messages else MARKERS["assistant"])


def fit_dialog(
    ids: list[int], mask: list[int], ends: list[int], messages: Sequence[dict[str, Any]], max_tokens: int
) -> tuple[list[int], list[int]] | None:
    """Cut a rendered dialog to at most ``max_tokens`` ids at a turn boundary: the system prompt and
    the first exchanges that fit (ending with an assistant turn); None if not even one fits."""
    if len(ids) <= max_tokens:
        return ids, mask
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant" and ends[k] <= max_tokens),
               default=None)  # fmt: skip
    return None if last is None else (ids[: ends[last]], mask[: ends[last]])


def fit_history(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], max_tokens: int
) -> tuple[list[int], int]:
    """(prompt ids, dropped turns): the prompt for the next reply after dropping the oldest
    user/assistant exchanges (never the system prompt, never the last user turn) until it fits."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, dropped = list(messages[len(system) :]), 0
    while True:
        ids = render_prompt(tokenizer, system + turns)
        if len(ids) <= max_tokens or len(turns) <= 1:
            return ids, dropped
        turns, dropped = turns[2:], dropped + 2  # one user turn and its reply


# ------------------------------------------------------------------------------------- batches
class DialogBatches:
    """SFT batches of whole dialogs, one per row, right-padded; a pure function of (seed, step,
    position in the global batch), like ``gpt.data.TokenWindows``.

    Epoch ``e`` shuffles the dialogs with an RNG seeded by ``(seed, e)`` and cuts them into
    ``n // batch_size`` batches (the remainder waits for a later epoch's shuffle). To spend little
    compute on padding, each run of ``group`` consecutive batches is first sorted by length, and the
    batches are then shuffled again. Every row of a global batch is padded to the batch's longest
    dialog (so any split over processes and micro-steps sees the same tensors): x with
    <|endoftext|>, y with -1 (no loss). Padding sits after a dialog's end, so causal attention never
    lets a real token see it."""

    def __init__(
        self, examples: list[tuple[list[int], list[int]]], seed: int, pad_id: int, group: int = 8
    ) -> None:
        self.seed, self.pad_id, self.n, self.group = seed, pad_id, len(examples), group
        # x = ids[:-1]; y = ids[1:] where the mask of ids[1:] is set, else -1
        self.x = [np.asarray(ids[:-1], dtype=np.int64) for ids, _ in examples]
        self.y = [np.where(np.asarray(mask[1:]) == 1, ids[1:], -1).astype(np.int64) for ids, mask in examples]
        self.lengths = np.array([len(x) for x in self.x], dtype=np.int64)
        self._epoch: tuple[tuple[int, int], np.ndarray] | None = None  # the last epoch's batches

    def order(self, step: int, batch_size: int) -> np.ndarray:
        """Dialog indices of global batch ``step``: shape (batch_size,)."""
        per_epoch = max(1, self.n // batch_size)
        epoch, b = divmod(step, per_epoch)
        if self._epoch is None or self._epoch[0] != (epoch, batch_size):
            rng = np.random.default_rng([self.seed % (1 << 63), epoch])
            ids = np.resize(rng.permutation(self.n), per_epoch * batch_size)  # repeats if n < batch_size
            chunk = self.group * batch_size
            for s in range(0, len(ids), chunk):  # similar lengths side by side
                ids[s : s + chunk] = ids[s : s + chunk][
                    np.argsort(self.lengths[ids[s : s + chunk]], kind="stable")
                ]
            batches = ids.reshape(per_epoch, batch_size)[rng.permutation(per_epoch)]
            self._epoch = ((epoch, batch_size), batches)
        return self._epoch[1][b]

    def get(self, step: int, batch_size: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 CPU tensors (count, L) for global-batch positions [start, start + count), where
        L <= block_size is the longest dialog of the whole global batch."""
        import torch

        if not (0 <= start and count >= 0 and start + count <= batch_size):
            raise ValueError(f"positions [{start}, {start + count}) outside a batch of {batch_size}")
        order = self.order(step, batch_size)
        width = int(self.lengths[order].max())
        x = np.full((count, width), self.pad_id, dtype=np.int64)
        y = np.full((count, width), -1, dtype=np.int64)
        for row, i in enumerate(order[start : start + count]):
            x[row, : self.lengths[i]], y[row, : self.lengths[i]] = self.x[i], self.y[i]
        return torch.from_numpy(x), torch.from_numpy(y)

    def padding_fraction(self, batch_size: int, steps: int | None = None) -> float:
        """Fraction of the (rows x width) positions of the first ``steps`` global batches (default:
        one epoch) that are padding."""
        steps = steps or max(1, self.n // batch_size)
        real = padded = 0
        for step in range(steps):
            lengths = self.lengths[self.order(step, batch_size)]
            real, padded = real + int(lengths.sum()), padded + int(lengths.max()) * batch_size
        return 1 - real / padded


def render_all(
    tokenizer: Tokenizer, dialogs: list[Dialog], block_size: int, problems: list[str]
) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """(examples, truncated, too_long) for training with ``block_size``: a dialog longer than
    block_size + 1 tokens is cut at a turn boundary (``fit_dialog``) or, when its first exchange
    alone is too long, left out. A dialog the tokenizer cannot encode adds a problem."""
    examples, truncated, too_long = [], 0, 0
    for d in dialogs:
        try:
            ids, mask, ends = render_turns(tokenizer, d.messages)
        except UserError as e:
            problems.append(f"{d.source}: {e}")
            continue
        fitted = fit_dialog(ids, mask, ends, d.messages, block_size + 1)  # x and y are one shorter
        truncated += fitted is not None and len(fitted[0]) < len(ids)
        too_long += fitted is None
        if fitted is not None:
            examples.append(fitted)
    return examples, truncated, too_long


def dialog_sources(
    cfg: DataConfig,
    tokenizer: Tokenizer | None,
    block_size: int,
    seed: int,
    show_progress: bool = True,
    batch_size: int | None = None,
) -> tuple[Tokenizer, DialogBatches, DialogBatches, DialogBatches | None]:
    """The ``data.format=dialogs`` hook of ``gpt.setup``: (tokenizer, train, train_eval, val).
    The tokenizer is the model's (init_from) or, for a fresh model, built from the dialogs' text."""
    from gpt.tokenizer import build_tokenizer

    dialogs, skipped = read_dialogs(cfg.path, cfg.separator, cfg.skip_invalid)
    train, val = split_dialogs(dialogs, cfg.val_fraction)
    if tokenizer is None:
        texts = lambda: (
            "\n".join(f"{MARKERS[m['role']]} {m['content']}" for m in d.messages) for d in dialogs
        )
        tokenizer = build_tokenizer(
            cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path, cfg.bpe_train_bytes
        )
    problems: list[str] = []
    train_ex, cut, too_long = render_all(tokenizer, train, block_size, problems)
    val_ex, val_cut, val_long = render_all(tokenizer, val, block_size, problems)
    if problems and not cfg.skip_invalid:
        raise _problems(
            f"{len(problems)} dialog(s) cannot be encoded by the {tokenizer.kind} tokenizer", problems
        )
    skipped += len(problems)
    if not train_ex or (val and not val_ex):
        raise DataError(f"no dialog of {cfg.path} fits block_size={block_size} (even cut after its first "
                        "exchange); use a model with a longer context or shorter dialogs")  # fmt: skip
    pad = tokenizer.eot_id
    sources = (DialogBatches(train_ex, seed, pad), DialogBatches(train_ex, seed + 1, pad))
    val_source = DialogBatches(val_ex, seed + 2, pad) if val_ex else None
    if show_progress:
        padding = f", padding {100 * sources[0].padding_fraction(batch_size):.0f}%" if batch_size else ""
        print(f"dialogs: {len(train_ex)} train, {len(val_ex)} val from {cfg.path} ({skipped} malformed "
              f"skipped; {cut + val_cut} cut at a turn boundary and {too_long + val_long} left out for "
              f"block_size={block_size}){padding}", file=sys.stderr, flush=True)  # fmt: skip
    return tokenizer, sources[0], sources[1], val_source


# -------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gpt.chat", description="Check a dialog file and show it rendered."
    )
    p.add_argument("path", help="a .jsonl or plain-text dialog file, a directory or a glob")
    p.add_argument("--separator", default=None, help="plain text: the line between dialogs (default: blank)")
    p.add_argument("--tokenizer", default=None, help="a run directory or tokenizer.json to render with")
    p.add_argument("--show", type=int, default=1, help="dialogs to print rendered, [trained] in brackets")
    a = p.parse_args(argv)
    try:
        dialogs, _ = read_dialogs(a.path, a.separator)
        print(f"{len(dialogs)} dialogs, {sum(len(d.messages) for d in dialogs)} messages: all valid")
        if a.tokenizer:
            from gpt.tokenizer import load_tokenizer

            tok = load_tokenizer(a.tokenizer)
            for d in dialogs[: a.show]:
                ids, mask = render_dialog(tok, d.messages)
                print(f"--- {d.source}: {len(ids)} tokens, {sum(mask)} trained")
                for trained, group in itertools.groupby(zip(ids, mask, strict=True), key=lambda im: im[1]):
                    text = tok.decode([i for i, _ in group])
                    print(f"[{text}]" if trained else text, end="")
                print()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
