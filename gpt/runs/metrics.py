"""A run's records: ``metrics.jsonl``, one JSON object per eval (``step``, ``tokens``, ``train_loss``,
``val_loss``, ``lr``, ``elapsed_s``, ...) and per guard event (``step``, ``event``: ``skipped``,
``rollback``, ...), written by ``gpt.train.monitor``.

    from gpt.runs.metrics import read_metrics
    records = read_metrics("out/shakespeare_char")

The file is strict JSON, one object a line: a non-finite number is written as the string ``"nan"``,
``"inf"`` or ``"-inf"`` (and read back as a float), so that every JSON parser reads it; a missing
value (no val split) is ``null``. A torn or NUL-padded line (a crash mid-write) is skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its non-finite floats as the strings "nan", "inf", "-inf"."""
    return {
        k: (str(v).lower() if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def parse_record(line: str) -> dict[str, Any] | None:
    """One line of metrics.jsonl as a record (non-finite numbers back as floats); None for a blank,
    torn or NUL-padded line."""
    line = line.replace("\x00", "").strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def read_metrics(out_dir: str | Path, events: bool = False) -> list[dict[str, Any]]:
    """The eval records of a run's metrics.jsonl (for plots, comparisons and tests); with
    ``events=True`` the guard's event records too, in file order."""
    path = Path(out_dir) / "metrics.jsonl"
    records = [r for r in map(parse_record, path.read_text(errors="replace").splitlines()) if r is not None]
    return records if events else [r for r in records if "event" not in r]
