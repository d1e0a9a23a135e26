"""Why a run stops, and Ctrl-C / SIGTERM during training: finish the step, save a checkpoint,
stop. Before the first step (data preparation, tokenizer training, set-up) there is nothing to save:
the run stops at once (``Interrupted``, no traceback), its ``finally`` blocks removing temp folders
and stopping workers. The library only says why it stopped (``Stop``); the command maps that to an
exit status (``gpt.commands.train``).

    with StopFlag() as stop:
        ...
        if stop.reason: ...          # Stop.SIGINT or Stop.SIGTERM once a signal arrived

Under torchrun every worker gets the terminal's Ctrl-C, and then torchrun's copy of it; ranks that
see a stop at different steps agree on the latest of ``AGREED`` that any of them saw (see
``gpt.train.loop``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from enum import StrEnum
from typing import Any

from gpt.train import distributed as D


class Stop(StrEnum):
    """Why ``Trainer.fit`` returned."""

    DONE = "done"  # train.max_steps reached (maybe before this resume=true)
    REQUESTED = "requested"  # a Python caller's should_stop(step)
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"
    DIVERGED = "diverged"  # train.max_rollbacks rollbacks in a row did not help


# the stops ranks agree on (index = the code all-reduced with max): a signal outranks a request
AGREED = (None, Stop.REQUESTED, Stop.SIGTERM, Stop.SIGINT)


class Interrupted(BaseException):
    """A signal before the first step: unwinds the set-up as Ctrl-C does (no ``except Exception``
    catches it); ``gpt.train.loop.train`` returns its ``stop``."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.value)
        self.stop = stop


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and stops. A second Ctrl-C
    interrupts at once (a second or more later, so torchrun's forwarded copy of the first is not
    taken for a second one)."""

    def __init__(self) -> None:
        self.reason: Stop | None = None
        self.immediate = True  # until the training loop starts (gpt.train.loop sets it False)
        self._since = 0.0
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        name = Stop(signal.Signals(signum).name)
        if self.immediate:
            D.print0(f"\n{name} received before the first step: stopping (nothing to save yet)")
            raise Interrupted(name)
        if self.reason is not None and signum == signal.SIGINT and time.monotonic() - self._since > 1.0:
            raise KeyboardInterrupt
        first = self.reason is None
        if first:
            self._since = time.monotonic()
        self.reason = name
        if first:  # one notice, on rank 0 only
            D.print0(f"\n{self.reason} received: finishing this step, saving a checkpoint, then exiting")

    def code(self) -> int:
        """This process's stop as an ``AGREED`` index (0: none)."""
        return AGREED.index(self.reason)

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
