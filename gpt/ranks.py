"""This process's place among the processes of a job, and their agreements: one type for training
(``gpt.train.distributed`` joins the process group and fills it in) and data preparation
(``gpt.data.prepare`` shares the tokenization out by rank).

    ranks = Ranks.current()                          # from the process group, if one was joined
    total, nbytes = ranks.sum([my_tokens, my_bytes])  # identity in a world of one
    stop = ranks.max([my_stop_code])[0]              # what every rank agrees on
    table = ranks.main_first(build_cache)            # rank 0 fills a cache, then the others read it

A single process is a world of one: no process group, every agreement the identity, and
``torch.distributed`` never imported (``gpt prepare`` does not pay torch's start-up). Agreements are
small integer collectives on the CPU, over ``control`` (a gloo group; None = the default group).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gpt.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
_WAITS = itertools.count()  # every rank waits at the same points in the same order


@dataclass
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    """This rank's torch.device (training sets it); None: data preparation, which needs no torch."""
    control: Any = None
    """CPU (gloo) group for the agreements; None = the default group (gloo on CPU)."""
    patient: bool = False
    """Every agreement first waits for all ranks in the rendezvous store, without a collective
    timeout (data preparation: a rank may train a BPE tokenizer for an hour); the per-step
    agreements of training are plain collectives."""

    @classmethod
    def current(cls, control: Any = None) -> Ranks:
        """The process group this process joined (a world of one if none)."""
        dist = sys.modules.get("torch.distributed")  # never imported: there is no process group
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return cls()
        if dist.get_world_size(control) == 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(dist.get_rank(control), local, dist.get_world_size(control), control=control)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def _reduce(self, values: list[int], op: str) -> list[int]:
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist

        if self.patient:
            self.wait_all("the other ranks' data preparation")
        t = torch.tensor(values, dtype=torch.int64)  # on the CPU: the control group is gloo
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.control)
        return t.tolist()

    def sum(self, values: list[int]) -> list[int]:
        return self._reduce(values, "sum")

    def max(self, values: list[int]) -> list[int]:
        """What every rank agrees on when each may have seen something different (a stop signal)."""
        return self._reduce(values, "max")

    def broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        return self.sum([value if self.is_main else 0])[0]

    def barrier(self) -> None:
        self.sum([0])

    def agree(self, error: UserError | None) -> None:
        """Raise on every rank when any rank failed (the failing one raises its own error)."""
        failed = self.max([self.rank + 1 if error is not None else 0])[0]
        if error is not None:
            raise error
        if failed:
            raise DataError(
                f"data preparation failed on rank {failed - 1} (its error is above); fix it and re-run"
            )

    def wait_all(self, what: str, notice_every_s: float = 60.0) -> None:
        """A barrier with no collective timeout, for work of unbounded length: each rank counts itself
        in torchrun's rendezvous store, then polls it, saying every ``notice_every_s`` what it waits
        for. A rank that dies is torchrun's to handle (it stops the others)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            return  # no store to wait on: the collective that follows waits
        key = f"gpt/wait/{next(_WAITS)}"
        store.add(key, 1)
        t0 = last = time.monotonic()
        while store.add(key, 0) < self.world_size:
            time.sleep(0.02)
            if time.monotonic() - last >= notice_every_s:
                last = time.monotonic()
                print(f"rank {self.rank}: waiting for {what} ({last - t0:.0f}s)", file=sys.stderr, flush=True)

    def main_first(self, make: Callable[[], T]) -> T:
        """Run ``make`` on rank 0 first (it fills caches), then on the first rank of every other node
        (a hit on a shared filesystem, its own copy on a local disk), then on all the others."""
        if self.is_main:
            result = make()
        self.wait_all("rank 0 to prepare the data")
        if self.local_rank == 0 and not self.is_main:
            result = make()
        self.wait_all("the other nodes to prepare the data")
        if self.local_rank != 0:
            result = make()
        return result

    def check_same(self, value: str, what: str) -> None:
        """ConfigError unless every rank computed the same ``value`` (a fingerprint of ``what``)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, value, group=self.control)
        differ = [r for r, v in enumerate(every) if v != every[0]]
        if differ:
            raise ConfigError(
                f"ranks {differ} have other {what} than rank 0; start every rank with the same command "
                "line and the same data (a shared filesystem, or identical copies on each node)"
            )
