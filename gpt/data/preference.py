"""Preference pairs: two replies to the same conversation, one preferred (the data side of DPO).

    pairs, skipped = read_pairs("pairs.jsonl")             # DataError lists every problem
    tokenizer, train, train_eval, val = pair_sources(cfg.data, tokenizer, block_size, seed)
    x, y, ref = train.get(step, batch_size=16, start=0, count=16)

A JSONL line is either

- ``{"prompt": [messages] | str, "chosen": [messages] | str, "rejected": [messages] | str}``: the
  prompt ends with a user turn; a reply given as messages is one assistant message (a list that
  repeats the prompt first, as some datasets store it, is accepted and the prompt is stripped); or
- ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}`` (Anthropic HH): two
  transcripts sharing the conversation and differing in the last assistant turn.

Every problem (malformed JSON, identical replies, no shared prompt, an empty reply, bad turns) is
reported with its file and line, as for dialogs (``data.skip_invalid`` skips them). Rendering is the
one chat template: the loss covers the last reply's tokens and its end-of-turn only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt.chat_template import check_messages, dialog_text, render_turns
from gpt.data.corpus import input_files
from gpt.data.dialogs import jsonl_records, problems_error, split_dialogs
from gpt.data.formats import hh_messages
from gpt.data.sft import DialogBatches, pack_rows
from gpt.data.tokenizers import build_tokenizer
from gpt.errors import DataError, UserError
from gpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gpt.config import DataConfig


@dataclass
class Pair:
    prompt: list[dict[str, Any]]  # the shared conversation, ending with a user turn
    chosen: str  # the preferred assistant reply
    rejected: str
    source: str  # "file:line"


def _reply(value: Any, prompt: list[dict[str, Any]], name: str) -> tuple[str | None, str | None]:
    """(reply text, problem) of a "chosen"/"rejected" value: a string, or messages that are one
    assistant reply (after the prompt, when the list repeats it)."""
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, f'"{name}" is an empty reply')
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        return None, f'"{name}" must be a string or a list of {{"role", "content"}} messages'
    if len(value) > len(prompt) and [dict(m) for m in value[: len(prompt)]] == prompt:
        value = value[len(prompt) :]  # the whole conversation was stored: keep what follows the prompt
    if len(value) != 1 or value[0].get("role") != "assistant":
        return None, f'"{name}" must be one assistant message (got {len(value)} message(s))'
    content = value[0].get("content")
    if not isinstance(content, str) or not content.strip():
        return None, f'"{name}" is an empty reply'
    return content, None


def _hh_pair(obj: dict[str, Any]) -> tuple[Pair | None, list[str]]:
    chosen, rejected = hh_messages(obj["chosen"]), hh_messages(obj["rejected"])
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs is None:
            return None, [f'"{name}" is not a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript '
                          '(and no "prompt" given)']  # fmt: skip
        if msgs[-1]["role"] != "assistant":
            return None, [f'"{name}" must end with an Assistant: turn']
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        return None, ['"chosen" and "rejected" share no prompt: they must be the same conversation up to '
                      "their last Assistant: turn"]  # fmt: skip
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        return None, ['"chosen" or "rejected" ends with an empty Assistant: reply']
    found = check_messages(chosen[:-1], final_role="user")  # the shared conversation: turns in order
    if found:
        return None, [f"turn {i + 1}: {text}" for i, text in found]
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], ""), []


def parse_pair(obj: Any) -> tuple[Pair | None, list[str]]:
    """(pair, problems) of one JSONL record (``source`` left empty)."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        return None, ['expected {"prompt": ..., "chosen": ..., "rejected": ...} or HH transcripts '
                      '{"chosen": "\\n\\nHuman: ...", "rejected": ...}']  # fmt: skip
    if "prompt" not in obj:
        pair, problems = _hh_pair(obj)
    else:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and not prompt:
            return None, ['"prompt" is empty: a pair needs the conversation both replies answer']
        found = check_messages(prompt, final_role="user")
        if found:
            return None, [f"prompt message {i + 1}: {text}" for i, text in found]
        prompt = [dict(m) for m in prompt]
        chosen, p1 = _reply(obj["chosen"], prompt, "chosen")
        rejected, p2 = _reply(obj["rejected"], prompt, "rejected")
        problems = [p for p in (p1, p2) if p]
        pair = None if problems else Pair(prompt, chosen, rejected, "")
    if pair is not None and pair.chosen.strip() == pair.rejected.strip():
        return None, ['"chosen" and "rejected" are identical: a pair must prefer one reply over another']
    return pair, problems


def read_pairs(path: str | Path, skip_invalid: bool = False) -> tuple[list[Pair], int]:
    """The valid pairs of a JSONL file, directory or glob, and the count of skipped bad ones. Bad
    pairs raise one DataError listing every problem with file and line, unless ``skip_invalid``."""
    problems: list[str] = []
    pairs, bad = [], 0
    for file in input_files(path):
        for where, obj, problem in jsonl_records(file):
            pair, found = (None, [problem]) if problem else parse_pair(obj)
            if found:
                problems += [f"{where}: {text}" for text in found]
                bad += 1
            else:
                pair.source = where
                pairs.append(pair)
    if problems and not skip_invalid:
        raise problems_error(f"{bad} malformed preference pair(s) in {path}", problems)
    if not pairs:
        raise DataError(f"{path} holds no preference pairs; the README's chat section describes the format")
    return pairs, bad


def render_pair(tokenizer: Tokenizer, pair: Pair, max_tokens: int
                ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]] | None:  # fmt: skip
    """((ids, mask) of prompt + chosen, (ids, mask) of prompt + rejected), the mask on the last reply
    and its end-of-turn only; the oldest exchanges of the prompt (never the system prompt, never
    the last user turn) are dropped until both fit ``max_tokens``; None if they never do."""
    system = pair.prompt[:1] if pair.prompt[0]["role"] == "system" else []
    turns = pair.prompt[len(system) :]
    while True:
        out = []
        for reply in (pair.chosen, pair.rejected):
            messages = [*system, *turns, {"role": "assistant", "content": reply}]
            ids, mask, ends = render_turns(tokenizer, messages)
            out.append((ids, [0] * ends[-2] + mask[ends[-2] :]))  # the last reply only
        if max(len(ids) for ids, _ in out) <= max_tokens:
            return out[0], out[1]
        if len(turns) <= 1:
            return None
        turns = turns[2:]


class PairBatches(DialogBatches):
    """Batches of pairs, a pure function of (seed, step, position) like ``DialogBatches`` (pairs of
    similar length side by side). ``get`` gives x, y of shape (2 * count, L): the chosen rows
    first, then the rejected ones in the same order, and ``ref`` (count, 2): the reference model's
    log-probabilities of (chosen, rejected), NaN until ``set_reference`` (LoRA computes them live)."""

    def __init__(self, examples: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]],
                 seed: int, pad_id: int) -> None:  # fmt: skip
        super().__init__([c for c, _ in examples] + [r for _, r in examples], seed, pad_id)
        self.n = len(examples)  # order() draws pair indices; pair i's rejected row is i + n
        self.lengths = np.maximum(self.lengths[: self.n], self.lengths[self.n :])
        self.ref = np.full((self.n, 2), np.nan)

    def set_reference(self, ref: np.ndarray) -> None:
        """(n, 2) reference log-probabilities of (chosen, rejected) of every pair."""
        self.ref = np.asarray(ref, dtype=np.float64).reshape(self.n, 2)

    def rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every (x, y) row: the n chosen ones, then the n rejected ones (for the reference pass)."""
        return list(zip(self.x, self.y, strict=True))

    def get(self, step: int, batch_size: int, start: int, count: int):  # type: ignore[override]
        import torch

        if not (start >= 0 and count >= 0 and start + count <= batch_size):
            raise ValueError(f"positions [{start}, {start + count}) outside a batch of {batch_size}")
        order = self.order(step, batch_size)
        pick = order[start : start + count]
        rows = [[(self.x[i], self.y[i])] for i in [*pick, *(pick + self.n)]]  # the chosen, then the rejected
        x, y, _ = pack_rows(rows, int(self.lengths[order].max()), self.pad_id)
        return x, y, torch.from_numpy(self.ref[pick].astype(np.float32))


def pair_sources(
    cfg: DataConfig, tokenizer: Tokenizer | None, block_size: int, seed: int, show_progress: bool = True
) -> tuple[Tokenizer, PairBatches, PairBatches, PairBatches | None]:
    """The ``data.format=pairs`` hook of ``gpt.train.setup``: (tokenizer, train, train_eval, val)."""
    pairs, skipped = read_pairs(cfg.path, cfg.skip_invalid)
    train, val = split_dialogs(pairs, cfg.val_fraction)  # the last val_fraction of the pairs
    if tokenizer is None:
        texts = lambda: (
            dialog_text(p.prompt) + f" {p.chosen} {p.rejected}"
            for p in pairs
        )
        tokenizer = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path,
                                    cfg.bpe_train_bytes)  # fmt: skip
    problems: list[str] = []

    def render(part: list[Pair]) -> tuple[list, int]:
        out, too_long = [], 0
        for p in part:
            try:
                rendered = render_pair(tokenizer, p, block_size + 1)  # x and y are one shorter
            except UserError as e:
                problems.append(f"{p.source}: {e}")
                continue
            too_long += rendered is None
            if rendered is not None:
                out.append(rendered)
        return out, too_long

    (train_ex, long_train), (val_ex, long_val) = render(train), render(val)
    if problems and not cfg.skip_invalid:
        raise problems_error(f"{len(problems)} pair(s) cannot be encoded by the {tokenizer.kind} tokenizer",
                             problems)  # fmt: skip
    if not train_ex or (val and not val_ex):
        raise DataError(f"no preference pair of {cfg.path} fits block_size={block_size}; use a model with a "
                        "longer context or shorter pairs")  # fmt: skip
    pad = tokenizer.eot_id
    val_source = PairBatches(val_ex, seed + 2, pad) if val_ex else None
    if show_progress:
        print(f"preference pairs: {len(train_ex)} train, {len(val_ex)} val from {cfg.path} "
              f"({skipped + len(problems)} malformed skipped, {long_train + long_val} left out for "
              f"block_size={block_size})", file=sys.stderr, flush=True)  # fmt: skip
    return tokenizer, PairBatches(train_ex, seed, pad), PairBatches(train_ex, seed + 1, pad), val_source
