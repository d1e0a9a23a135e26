"""Atomic file writes: a reader (or a crash, or a full disk) never sees half a file.

    atomic_write(path, "text")                      # str (UTF-8) or bytes
    atomic_write(path, lambda f: torch.save(state, f))   # or a function writing a binary file

The data goes to a temporary file beside ``path`` (``.NAME.*.tmp``), is flushed to disk, given the
mode an ordinary new file gets (0666 less the umask: the others on a shared machine may read a run
as they read its other files), then renamed over ``path`` in one step. On any failure the temporary
file is removed and ``path`` is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
