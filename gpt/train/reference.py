"""DPO's reference policy without a second model in memory: the frozen initial model's
log-probabilities of every pair's two replies, computed once before training and cached.

    line = attach_reference(cfg, model, (train, train_eval, val), out_dir, info, resume=False)

The cache file ``<data.cache_dir>/<data.name>-reference-<key>.npy`` is keyed by every rendered
token of the pairs (so by the data, the tokenizer and the block size) and by the fingerprint of the
initial weights: a second run on the same pairs from the same model reuses it, and a change of
either recomputes it. The run keeps its own copy (``out_dir/reference.npy``) for ``resume=true``,
when the initial weights are no longer at hand. LoRA runs need none of this: their reference is the
base model with the adapters off (``gpt.train.objective``).
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import torch

from gpt.atomic import atomic_write
from gpt.config import TrainRunConfig
from gpt.data.preference import PairBatches
from gpt.errors import CheckpointError
from gpt.ranks import Ranks
from gpt.runs.load import weights_fingerprint
from gpt.train.objective import sequence_logps
from gpt.typed_config import resolve_path

VERSION = 1  # bump when what the cache holds changes
RUN_COPY = "reference.npy"


@torch.no_grad()
def reference_logps(model: torch.nn.Module, rows: list[tuple[np.ndarray, np.ndarray]], device: torch.device,
                    batch_rows: int = 32) -> np.ndarray:  # fmt: skip
    """Sum of log p over each row's targets != -1 with ``model`` in eval mode: (len(rows),) float64.
    Rows of similar length are batched together (right-padded; padding is never attended to)."""
    was_training = model.training
    model.eval()
    out = np.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for s in range(0, len(order), batch_rows):
        pick = order[s : s + batch_rows]
        width = max(len(rows[i][0]) for i in pick)
        x = torch.zeros(len(pick), width, dtype=torch.long)
        y = torch.full((len(pick), width), -1, dtype=torch.long)
        for r, i in enumerate(pick):
            x[r, : len(rows[i][0])], y[r, : len(rows[i][1])] = (
                torch.from_numpy(rows[i][0]),
                torch.from_numpy(rows[i][1]),
            )
        logps, _ = sequence_logps(model(x.to(device)), y.to(device))
        out[pick] = logps.double().cpu().numpy()
    model.train(was_training)
    return out


def cache_key(sources: list[PairBatches], model: torch.nn.Module) -> str:
    """Hash of everything the reference log-probs depend on: every token and target of every row,
    and the initial weights."""
    h = hashlib.sha256(f"v{VERSION}".encode())
    for source in sources:
        for x, y in source.rows():
            h.update(x.tobytes() + b"|" + y.tobytes() + b";")
    h.update(weights_fingerprint(model.state_dict()).encode())
    return h.hexdigest()[:16]


def _save(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, buf.getvalue())


def attach_reference(
    cfg: TrainRunConfig,
    model: torch.nn.Module,
    sources: tuple[PairBatches, PairBatches, PairBatches | None],
    out_dir: Path,
    info: Ranks,
    resume: bool,
) -> str:
    """Give the sources their reference log-probs (train_eval holds train's pairs): from the run's
    copy on resume, else from the cache, else computed; returns a line saying which."""
    train, train_eval, val = sources
    distinct = [train] if val is None else [train, val]
    run_copy = out_dir / RUN_COPY
    if resume:
        if not run_copy.is_file():
            raise CheckpointError(f"{run_copy} is missing: a DPO run resumes with the reference log-probs it "
                                  "started with; start the run again without resume=true")  # fmt: skip
        table, how = np.load(run_copy, allow_pickle=False), f"from {run_copy}"
    else:
        key = cache_key(distinct, model)
        cache = resolve_path(cfg.data.cache_dir) / f"{cfg.data.name}-reference-{key}.npy"

        def make() -> tuple[np.ndarray, str]:
            if cache.is_file():
                return np.load(cache, allow_pickle=False), f"reused {cache}"
            t0 = time.time()
            rows = [r for s in distinct for r in s.rows()]
            table = reference_logps(model.to(info.device), rows, info.device)
            cache.parent.mkdir(parents=True, exist_ok=True)
            _save(cache, table)
            return table, f"computed for {len(rows) // 2} pairs in {time.time() - t0:.1f}s, cached in {cache}"

        table, how = info.main_first(make)
        if info.is_main:
            _save(run_copy, table)
    expected = sum(2 * s.n for s in distinct)
    if table.shape != (expected,):
        raise CheckpointError(f"the reference log-probs ({how}) hold {table.shape[0]} rows, the pairs "
                              f"{expected}; delete the file and start again")  # fmt: skip
    offset = 0
    for s in distinct:
        part = table[offset : offset + 2 * s.n]  # the n chosen rows, then the n rejected ones
        offset += 2 * s.n
        s.set_reference(np.stack([part[: s.n], part[s.n :]], axis=1))  # (n, 2)
    train_eval.set_reference(train.ref)
    return f"reference log-probs: {how}"
