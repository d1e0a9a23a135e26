"""A run's records: ``metrics.jsonl``, one JSON object per eval (``step``, ``tokens``, ``train_loss``,
``val_loss``, ``lr``, ``elapsed_s``, ...), written by ``gpt.train.monitor``.

    from gpt.runs.metrics import read_metrics
    records = read_metrics("out/shakespeare_char")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (for plots, comparisons and tests)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
