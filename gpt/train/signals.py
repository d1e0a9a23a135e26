"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, exit. Before the first
step (data preparation, tokenizer training, set-up) there is nothing to save: the run exits at once
(130 or 143, no traceback), its ``finally`` blocks removing temp folders and stopping workers.

    with StopFlag() as stop:
        ...
        if stop.reason: ...          # "SIGINT" or "SIGTERM" once a signal arrived

Under torchrun every worker gets the terminal's Ctrl-C, and then torchrun's copy of it; ranks that
see a signal at different steps agree on the largest ``CODES`` value (see ``gpt.train.loop``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, ClassVar

from gpt.train import distributed as D


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and exits. A second Ctrl-C
    interrupts at once (a second or more later, so torchrun's forwarded copy of the first is not
    taken for a second one)."""

    CODES: ClassVar[dict[str, int]] = {"SIGTERM": 2, "SIGINT": 3}  # 1 = should_stop(); the ranks act
    REASONS: ClassVar[dict[int, str]] = {2: "SIGTERM", 3: "SIGINT"}  # on the largest code seen

    def __init__(self) -> None:
        self.reason: str | None = None
        self.immediate = True  # until the training loop starts (gpt.train.loop sets it False)
        self._since = 0.0
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.immediate:
            name = signal.Signals(signum).name
            D.print0(f"\n{name} received before the first step: stopping (nothing to save yet)")
            raise SystemExit(130 if signum == signal.SIGINT else 143)
        if self.reason is not None and signum == signal.SIGINT and time.monotonic() - self._since > 1.0:
            raise KeyboardInterrupt
        first = self.reason is None
        if first:
            self._since = time.monotonic()
        self.reason = signal.Signals(signum).name
        if first:  # one notice, on rank 0 only
            D.print0(f"\n{self.reason} received: finishing this step, saving a checkpoint, then exiting")

    def code(self) -> int:
        return self.CODES.get(self.reason or "", 0)

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
