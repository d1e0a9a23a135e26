"""Continuous batching: one model thread decodes every running request together.

A request (a prompt, its sampling settings, ``n`` choices) waits in a bounded queue until ``n`` rows
of the batch are free; then its prompt is prefilled once and copied into ``n`` rows of the
engine's ``Decoder`` (alone, the prefill is a one-row forward exactly as ``gpt.infer.generate`` runs
it; requests that wait together are prefilled as one right-padded batch). Every step runs
one single-token forward over all rows in use, each at its own position (the KV cache's per-row
lengths), and each row picks its next token with its own settings and its own seeded generator
(``gpt.infer.sampling.choose``: a request's output does not depend on what else is running). A row
leaves the batch as soon as it is done or its client is gone, and a waiting request takes its place
at the next step.

With a drafter (``gpt serve draft=ngram`` or ``draft=RUN``) a row alone in the batch (no logprobs, banned
or forced tokens) decodes speculatively (gpt.infer.speculative.verify: greedy gives plain decoding's text);
batched rows take plain steps, which already read the weights once for every row.

    batcher = Batcher(model, tokenizer, max_batch=16, max_queue=64)
    batcher.start()
    batcher.submit(Request(prompt_ids, GenerationConfig(temperature=0), n=1, emit=print))
    ...
    batcher.stop()

Results travel as events through ``Request.emit`` (called on the model thread): ``Piece`` (new text
of one choice, never half a character and never past a stop string, with its tokens' logprobs),
``Finish`` (a choice is done, ``finish_reason`` 'stop' or 'length', with its ids) and, last, ``Done``
(usage) or ``Failed``. A request may force the first tokens of every reply (``prefix``: the opening of a
tool call) and ban tokens from being sampled (``banned``: a tool call under tool_choice "none").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder
from gpt.infer.sampling import Row, TextStream, choose, prompt_counts
from gpt.infer.speculative import ModelDrafter, NgramDrafter, verify
from gpt.model import GPT

log = logging.getLogger("gpt.serve")


class QueueFull(Exception):
    """More requests wait than ``max_queue`` allows (the server answers 429)."""


@dataclass
class TokenLogprob:
    """One generated token: its id, log-probability and the most likely alternatives (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    choice: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finish:
    choice: int
    finish_reason: str  # "stop" | "length"
    ids: list[int] = field(default_factory=list)  # the reply's tokens (no stop token)
    stop_token: int | None = None  # the stop token that ended it, if one did


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Request:
    """One prompt to continue ``n`` times. ``emit`` receives the events, on the model thread."""

    prompt_ids: Sequence[int]
    config: GenerationConfig
    n: int = 1
    emit: Callable[[Any], None] = lambda event: None
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely
    prefix: Sequence[int] = ()  # tokens every choice takes first instead of sampling
    banned: frozenset[int] = frozenset()  # tokens never sampled
    cancelled: bool = False
    completion_tokens: int = 0
    finished_choices: int = 0
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class Choice:
    """A choice of a request being decoded: row ``i`` of the batch is ``rows[i]``."""

    request: Request
    choice: int
    row: Row  # its settings, generator, penalty counts, stop conditions and text
    logits: torch.Tensor  # (V,) the next position's logits
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0  # logprobs already emitted
    chosen: int | None = None  # the next token, already picked by a speculative check


class Stats:
    """Counters for /metrics (written by the model thread, read by the server)."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests_finished = 0
        self.steps = 0
        self.prefill_forwards = 0  # prefills run (one may hold several prompts)
        self.step_rows = 0  # sum over steps of rows in the batch (mean occupancy = step_rows / steps)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s
        self._lock = threading.Lock()  # the server thread reads _recent while the model thread appends

    def count(self, tokens: int) -> None:
        now = time.monotonic()
        self.completion_tokens += tokens
        with self._lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 seconds."""
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - 10.0]
        return sum(recent) / 10.0


class Batcher:
    """The scheduler and the model thread (see the module docstring)."""

    def __init__(self, model: GPT, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 prefill_tokens: int = 1024, drafter: NgramDrafter | ModelDrafter | None = None):  # fmt: skip
        self.model, self.tokenizer, self.drafter = model.eval(), tokenizer, drafter
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.device = model.lm_head.weight.device
        self.decoder = Decoder(model, max_batch)
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        self.rows: list[Choice] = []
        self.pending: deque[Request] = deque()
        self.wake = threading.Condition()
        self.stats = Stats()
        self._stopping = False
        self._paused = False  # decoding holds between steps (see pause)
        self._thread = threading.Thread(target=self._run, name="gpt-serve-model", daemon=True)

    # ------------------------------------------------------------------ the server's side (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the model thread."""
        with self.wake:
            self._stopping = True
            self.wake.notify()
        self._thread.join(timeout)

    def pause(self) -> None:
        """Hold the model thread between steps (requests queue up meanwhile) until ``resume``."""
        with self.wake:
            self._paused = True

    def resume(self) -> None:
        with self.wake:
            self._paused = False
            self.wake.notify()

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} exceeds the batch of {self.max_batch} rows")
        with self.wake:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting already; try again later")
            self.pending.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """The client is gone: its rows leave the batch at the next step."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def occupancy(self) -> int:
        return len(self.rows)

    # ----------------------------------------------------------------------------- the model thread
    def _run(self) -> None:
        while True:
            with self.wake:
                while not self._stopping and (self._paused or not (self.rows or self.pending)):
                    self.wake.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.rows:
                        self._step()
            except Exception as e:  # a bug must not hang every client: fail what is running, go on
                log.exception("model thread error")
                for request in {id(r.request): r.request for r in self.rows}.values():
                    request.emit(Failed(f"internal error: {type(e).__name__}: {e}"))
                self.rows.clear()
                self.decoder.rows = 0
        for request in [*{id(r.request): r.request for r in self.rows}.values(), *self.pending]:
            request.emit(Failed("the server is shutting down"))
        self.rows.clear()

    def _admit(self) -> None:
        """Move waiting requests into free rows, first come first served. The prompts of requests
        that wait together are prefilled as one batch (right-padded, at most ``prefill_tokens``)."""
        batch: list[Request] = []
        with self.wake:
            free = self.max_batch - len(self.rows)
            while self.pending:
                request = self.pending[0]
                if request.cancelled:
                    self.pending.popleft()
                    continue
                longest = max([len(request.prompt_ids), *(len(r.prompt_ids) for r in batch)])
                if request.n > free or (batch and longest * (len(batch) + 1) > self.prefill_tokens):
                    break
                batch.append(self.pending.popleft())
                free -= request.n
        if len(batch) > 1 and self._guarded(batch):
            return
        for request in batch:  # alone, or one by one after a batch failed: only a bad one fails
            self._guarded([request])

    def _guarded(self, batch: list[Request]) -> bool:
        """Prefill ``batch``; on an error, undo its rows (the rows already decoding go on), fail a lone
        request, and say so."""
        before = len(self.rows)
        try:
            self._prefill(batch)
            return True
        except Exception as e:
            log.exception("prefill failed")
            del self.rows[before:]
            self.decoder.rows = before
            if len(batch) == 1:
                batch[0].emit(Failed(f"the prompt could not be prefilled: {type(e).__name__}: {e}"))
            return False

    def _prefill(self, batch: list[Request]) -> None:
        """One forward over the right-padded prompts (b, T) in new rows (alone: a one-row prefill,
        exactly as ``gpt.infer.generate`` runs it); extra choices are copies of a request's row."""
        lengths = [len(r.prompt_ids) for r in batch]
        ids = torch.zeros(len(batch), max(lengths), dtype=torch.long, device=self.device)
        for i, request in enumerate(batch):
            ids[i, : lengths[i]] = torch.tensor(list(request.prompt_ids), device=self.device)
        self.stats.prefill_forwards += 1
        first = self.decoder.rows
        logits = self.decoder.add(ids, lengths)  # (b, V)
        counts = [prompt_counts(r.config, ids[i, : lengths[i]], self.vocab_size) for i, r in enumerate(batch)]
        for i, request in enumerate(batch):
            self.stats.prompt_tokens += lengths[i]
            self._add_row(request, 0, logits[i], counts[i])
        for i, request in enumerate(batch):
            for choice in range(1, request.n):
                self.decoder.copy_row(first + i)
                self._add_row(request, choice, logits[i], counts[i])

    def _add_row(self, request: Request, choice: int, logits: torch.Tensor,
                 counts: torch.Tensor | None) -> None:  # fmt: skip
        """The batch's next row (already filled in the cache) decodes this choice of the request."""
        cfg, generator = request.config, None
        if cfg.temperature > 0:
            generator = torch.Generator(device=self.device)
            # choice i of seed s draws from seed s + i: same seed, same text, whatever else runs
            generator.manual_seed((cfg.seed + choice) % 2**64) if cfg.seed is not None else generator.seed()
        counts = None if counts is None else counts.clone()
        row = Row(cfg, TextStream(self.tokenizer, cfg.stop), generator, counts, request.stop_token_ids,
                  forced=list(request.prefix))  # fmt: skip
        self.rows.append(Choice(request, choice, row, logits))

    def _step(self) -> None:
        """Pick every row's next token, emit text, retire finished rows, run one forward for the rest."""
        scores = torch.stack([c.logits for c in self.rows])[:, : self.vocab_size].float()  # (B, V)
        allowed = scores
        if any(c.request.banned for c in self.rows):
            allowed = scores.clone()
            for i, c in enumerate(self.rows):
                allowed[i, [t for t in sorted(c.request.banned) if t < self.vocab_size]] = float("-inf")
        tokens = choose([c.row for c in self.rows], allowed).tolist()
        for i, c in enumerate(self.rows):
            if c.chosen is not None:  # a speculative check picked it (by the target's own rule)
                tokens[i], c.chosen = c.chosen, None
            if not c.request.cancelled:
                self._emit(c, *c.row.next_forced(tokens[i]), scores[i])
        self._retire()
        if not self.rows:
            return
        self.stats.steps += 1
        self.stats.step_rows += len(self.rows)
        if len(self.rows) == 1 and self._speculate(self.rows[0]):
            self._retire()  # it may have finished on a kept draft
            return
        last = torch.tensor([c.row.last for c in self.rows], dtype=torch.long, device=self.device)
        logits = self.decoder.step(last)  # (B, V)
        for c, row_logits in zip(self.rows, logits):
            c.logits = row_logits

    def _retire(self) -> None:
        """Drop the finished and cancelled rows from the batch (and the cache), finishing the former."""
        done = [i for i, c in enumerate(self.rows) if c.request.cancelled or c.row.finished]
        for i in reversed(done):  # the last row moves into a freed one: go from the end
            c = self.rows[i]
            self.decoder.drop_row(i)
            self.rows[i] = self.rows[-1]
            self.rows.pop()
            if not c.request.cancelled:
                self._finish(c)

    def _speculate(self, c: Choice) -> bool:
        """The lone row's next forward with drafts: its last token and up to k drafts in one forward
        (row 0 of the cache), the kept drafts emitted, the next token chosen (``c.chosen``) with the
        logits it came from; False (nothing run) when there is nothing to draft."""
        row, request = c.row, c.request
        if self.drafter is None or request.logprobs is not None or request.banned or row.forced:
            return False
        length, cfg = self.decoder.lengths[0], row.config  # length: the cached positions
        room = min(
            self.drafter.k, self.model.config.block_size - length - 1, cfg.max_new_tokens - row.generated - 1
        )
        context = [*request.prompt_ids, *row.stream.ids]
        drafts, q = self.drafter.propose(context, room, cfg, row.generator) if room > 0 else ([], None)
        if not drafts:
            return False
        fed = torch.tensor([[row.last, *drafts]], dtype=torch.long, device=self.device)  # (1, k+1)
        logits = self.decoder.extend(fed)[0]  # (k+1, V): after the last token and after each draft
        scores = logits[:, : self.vocab_size].float()
        n, c.chosen = verify(row, scores, drafts, q)
        self.decoder.truncate(length + 1 + n)  # the fed token and the kept drafts
        c.logits = logits[n]
        for i, token in enumerate(drafts[:n]):
            self._emit(c, token, False, scores[i])
            if row.finished:
                break
        return True

    def _emit(self, c: Choice, token: int, forced: bool, scores: torch.Tensor) -> None:
        """Record the row's next token (chosen from scores (V,), or ``forced``), emit its new text and
        logprobs."""
        request, row = c.request, c.row
        if request.logprobs is not None:
            logprobs = F.log_softmax(scores, dim=-1)  # the model's distribution, before any control
            top = logprobs.topk(request.logprobs) if request.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            c.logprobs.append(TokenLogprob(token, float(logprobs[token]), alternatives))
        request.completion_tokens += 1
        self.stats.count(1)
        text = row.accept(token, forced)
        full = len(request.prompt_ids) + row.generated > self.model.config.block_size  # no room to feed it
        if full and not row.finished:
            text += row.stream.end("length")
        stream = row.stream
        shown = len(stream.ids) if stream.finished else stream.shown_tokens
        new = c.logprobs[c.sent : shown]
        c.sent = max(c.sent, shown)
        if text or new:
            request.emit(Piece(c.choice, text, new))

    def _finish(self, c: Choice) -> None:
        request = c.request
        row = c.row
        by_token = row.last in request.stop_token_ids and row.stream.finish_reason == "stop"
        stopped = row.last if by_token else None
        request.emit(Finish(c.choice, row.stream.finish_reason or "length", list(row.stream.ids), stopped))
        request.finished_choices += 1
        if request.finished_choices == request.n:
            self.stats.requests_finished += 1
            request.emit(Done(len(request.prompt_ids), request.completion_tokens))
