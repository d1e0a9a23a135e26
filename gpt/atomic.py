"""Atomic file writes: a reader (or a crash, or a full disk) never sees half a file.

    atomic_write(path, "text")                      # str (UTF-8) or bytes
    atomic_write(path, lambda f: torch.save(state, f))   # or a function writing a binary file

The data goes to a temporary file beside ``path`` (``.NAME.*.tmp``), is flushed to disk, given the
mode an ordinary new file gets (0666 less the umask: the others on a shared machine may read a run
as they read its other files), then renamed over ``path`` in one step. On any failure the temporary
file is removed and ``path`` is left as it was; a full disk (which torch's zip writer reports as
"unexpected pos ...") is a ``DiskFullError`` naming the path.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gpt.errors import DiskFullError

FULL_BELOW = 1 << 20  # a failed write with less free space than this is a full disk


def _disk_full(e: BaseException, directory: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, (OSError, RuntimeError)):  # torch.save: "unexpected pos", "file write failed"
        try:
            return shutil.disk_usage(directory).free < FULL_BELOW
        except OSError:
            return False
    return False


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` with ``data`` in one step (see the module docstring); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as e:
        full = _disk_full(e, path.parent)  # before the temp file is gone and its space free again
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                f"no space left on the device writing {path}; free some space (or write elsewhere: out_dir, "
                "data.cache_dir) and try again"
            ) from None
        raise
    return path
