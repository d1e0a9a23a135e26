"""The run directory as one run's property: a lock, stray temp files, replacing a run in one step.

    with RunLock(out_dir):          # a second run on out_dir is refused with who holds it
        clean_stray_files(out_dir)  # .NAME.*.tmp of killed writes, a replaced run's leftovers
        replace_run(out_dir)        # overwrite=true: the old run goes aside (checkpoints first)

    lock = claim_out_dir(out_dir, info)   # what train() does: rank 0 locks and cleans, all ranks agree

The lock is ``out_dir/.lock``: an ``flock`` on it (released by the kernel when its holder dies, so a
lock left by a killed run is stale by construction) plus the holder's pid, host and start time for
the message. Where the filesystem has no ``flock`` (some network filesystems), a lock whose holder
is a dead process on this host is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

from gpt.checkpoint import BEST_NAME, CKPT_NAME, HISTORY_RE
from gpt.errors import ConfigError
from gpt.ranks import Ranks

try:
    import fcntl
except ImportError:  # Windows: no flock, the pid check alone
    fcntl = None

LOCK_NAME = ".lock"
ASIDE_PREFIX = ".replaced-"
# what a run writes in its out_dir (gpt.checkpoint, gpt.train.setup, gpt.train.monitor, wandb)
RUN_FILES = {
    CKPT_NAME,
    BEST_NAME,
    "config.yaml",
    "tokenizer.json",
    "tokenizer.tiktoken",
    "metrics.jsonl",
    "wandb",
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """Exclusive use of a run directory for the life of a run (a context manager)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # what acquire made (the lock file, out_dir), newest first

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> None:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
        raise ConfigError(
            f"out_dir={self.out_dir} is in use by another run ({who}); wait for it to finish or stop it, "
            "or choose another out_dir"
        )

    def acquire(self) -> RunLock:
        self.created = [p for p in (self.path, self.out_dir) if not p.exists()]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        self._refuse(self._holder())
                    self._check_pid()  # no flock here (ENOLCK, ...): fall back on the recorded pid
            else:
                self._check_pid()
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _check_pid(self) -> None:
        holder = self._holder()
        pid, host = holder.get("pid"), holder.get("host")
        if pid and pid != os.getpid() and (host != socket.gethostname() or _alive(int(pid))):
            self._refuse(holder)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # no holder recorded: a later run reads it as free
            # a run that stopped before writing anything (a bad input) leaves the disk as it found it
            if self.created and [p.name for p in self.out_dir.iterdir()] == [LOCK_NAME]:
                for p in self.created:
                    p.unlink() if p == self.path else p.rmdir()
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stray_files(out_dir: str | Path) -> list[str]:
    """Remove what killed runs left behind (call it holding the lock): temp files of atomic writes
    (``.NAME.*.tmp``) and the folders of replaced runs. Returns the names removed."""
    out, removed = Path(out_dir), []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
        elif p.name.startswith(ASIDE_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        removed.append(p.name)
    return removed


def replace_run(out_dir: str | Path) -> bool:
    """``overwrite=true``: move the old run's files (``RUN_FILES`` and ``ckpt-STEP.pt``; nothing
    else of the directory) into a hidden folder, checkpoints first (once they are gone nothing
    resumes it), then delete that folder. A crash at any point leaves the old run without
    checkpoints or without its files, never a mix that resumes."""
    out = Path(out_dir)
    entries = [p for p in out.iterdir() if p.name in RUN_FILES or HISTORY_RE.match(p.name)]
    if not entries:
        return False
    aside = out / f"{ASIDE_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for p in sorted(entries, key=lambda p: (p.suffix != ".pt", p.name)):
        os.replace(p, aside / p.name)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def claim_out_dir(out_dir: str | Path, info: Ranks) -> RunLock:
    """Rank 0 locks out_dir and removes what killed runs left there; every rank learns the outcome."""
    lock, error = RunLock(out_dir), None
    if info.is_main:
        try:
            lock.acquire()
            clean_stray_files(out_dir)
        except ConfigError as e:
            error = e
    if info.max([int(error is not None)])[0]:
        raise error or ConfigError(f"out_dir={out_dir} is in use by another run (see rank 0)")
    return lock
