"""Prompts with a checkable answer: the data side of GRPO (``data.format=prompts``).

    prompts = read_prompts("prompts.jsonl")                      # DataError lists every bad line
    tokenizer, train, train_eval, val = prompt_sources(cfg.data, tokenizer, block_size, seed, epochs)
    batch = train.get(step, batch_size=8, start=0, count=8)     # a PromptBatch: (indices,) + .prompts

A JSONL line is ``{"messages": [...ending with a user turn], "answer": "..."}`` or
``{"prompt": "text", "answer": ...}`` (the answer may be a number; other keys are kept in the
record a ``module:function`` reward receives). The last ``data.val_fraction`` of the lines is held
out, as for dialogs and pairs. A batch is a pure function of (seed, rollout batch), where rollout
batch = step // grpo.epochs: the optimizer steps of one rollout batch see the same prompts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gpt.chat_template import check_messages, render_prompt
from gpt.data.corpus import input_files
from gpt.data.dialogs import jsonl_records, problems_error, split_dialogs
from gpt.data.tokenizers import build_tokenizer
from gpt.errors import DataError, UserError
from gpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gpt.config import DataConfig


@dataclass
class Prompt:
    messages: list[dict[str, Any]]  # the conversation, ending with a user turn
    answer: str  # what the 'exact' reward compares the reply's final answer to
    record: dict[str, Any]  # the whole JSONL object (a module:function reward gets it)
    source: str = ""  # "file:line"
    ids: list[int] = field(default_factory=list)  # render_prompt's ids


def parse_prompt(obj: Any) -> tuple[Prompt | None, str | None]:
    """(the prompt, None) or (None, what is wrong with the line)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    answer = obj.get("answer")
    if not isinstance(answer, str | int | float) or isinstance(answer, bool):
        return None, 'no "answer" (a string or a number): the reward checks replies against it'
    if "messages" in obj:
        messages = obj["messages"]
        problems = check_messages(messages, final_role="user")
        if problems:
            return None, "; ".join(f"message {i}: {text}" for i, text in problems)
    elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        return None, 'expected "messages" (ending with a user turn) or "prompt" (a non-empty string)'
    return Prompt([dict(m) for m in messages], str(obj["answer"]).strip(), obj), None


def read_prompts(path: str | Path, skip_invalid: bool = False) -> list[Prompt]:
    """The prompts of a JSONL file, directory or glob; one DataError lists every bad line (unless
    ``skip_invalid``)."""
    prompts, problems = [], []
    for file in input_files(path):
        for where, obj, problem in jsonl_records(file):
            prompt, problem = (None, problem) if problem else parse_prompt(obj)
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                prompt.source = where
                prompts.append(prompt)
    if problems and not skip_invalid:
        raise problems_error(f"{len(problems)} malformed prompt(s) in {path}", problems)
    if not prompts:
        raise DataError(f'{path} holds no prompts; each line is {{"messages": [...], "answer": "..."}}')
    return prompts


class PromptBatch(tuple):
    """A micro-batch of prompts: the tuple (indices (count,) int64,) that the loop reads, with the
    ``prompts`` themselves and ``key`` = (rollout batch, start), which names its rollouts."""

    prompts: list[Prompt]
    key: tuple[int, int]


class PromptBatches:
    """Batches of prompts, a pure function of (seed, rollout batch) (``step // epochs``)."""

    def __init__(self, prompts: list[Prompt], seed: int, epochs: int = 1) -> None:
        self.prompts, self.seed, self.epochs = prompts, seed, epochs

    def order(self, rollout: int, batch_size: int) -> np.ndarray:
        """Prompt indices of rollout batch ``rollout``: each pass over the prompts a new permutation."""
        per_epoch = max(1, len(self.prompts) // batch_size)
        epoch, b = divmod(rollout, per_epoch)
        rng = np.random.default_rng([self.seed % (1 << 63), epoch])
        ids = np.resize(rng.permutation(len(self.prompts)), per_epoch * batch_size)
        return ids.reshape(per_epoch, batch_size)[b]

    def get(self, step: int, batch_size: int, start: int, count: int) -> PromptBatch:
        if not (start >= 0 and count >= 0 and start + count <= batch_size):
            raise ValueError(f"positions [{start}, {start + count}) outside a batch of {batch_size}")
        rollout = step // self.epochs
        pick = self.order(rollout, batch_size)[start : start + count]
        batch = PromptBatch((torch.from_numpy(pick.astype(np.int64)),))
        batch.prompts, batch.key = [self.prompts[i] for i in pick], (rollout, start)
        return batch


Sources = tuple[Tokenizer, "PromptBatches", "PromptBatches", "PromptBatches | None"]


def prompt_sources(cfg: DataConfig, tokenizer: Tokenizer | None, block_size: int, seed: int, epochs: int,
                   max_new_tokens: int, show_progress: bool = True) -> Sources:  # fmt: skip
    """The ``data.format=prompts`` hook of ``gpt.train.setup``: (tokenizer, train, train_eval, val);
    a prompt that leaves no room for ``max_new_tokens`` in ``block_size`` is a DataError."""
    prompts = read_prompts(cfg.path, cfg.skip_invalid)
    train, val = split_dialogs(prompts, cfg.val_fraction)  # the last val_fraction of the lines
    if tokenizer is None:
        texts = lambda: (" ".join(m["content"] for m in p.messages) + " " + p.answer for p in prompts)
        tokenizer = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path,
                                    cfg.bpe_train_bytes)  # fmt: skip
    problems = []
    for p in prompts:
        try:
            p.ids = render_prompt(tokenizer, p.messages)
        except UserError as e:
            problems.append(f"{p.source}: {e}")
            continue
        if len(p.ids) + max_new_tokens > block_size:
            problems.append(f"{p.source}: {len(p.ids)} prompt tokens + grpo.max_new_tokens={max_new_tokens} "
                            f"exceed block_size={block_size}")  # fmt: skip
    if problems:
        raise problems_error(f"{len(problems)} prompt(s) do not fit", problems)
    if show_progress:
        print(f"prompts: {len(train)} train, {len(val)} val from {cfg.path}", file=sys.stderr, flush=True)
    val_source = PromptBatches(val, seed + 2) if val else None
    return tokenizer, PromptBatches(train, seed, epochs), PromptBatches(train, seed + 1, 1), val_source
