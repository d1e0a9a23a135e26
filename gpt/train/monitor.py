"""What a training run reports: a console line per log step (tokens/s from ``Throughput``), a
progress bar, ``metrics.jsonl`` (one JSON object per eval) and wandb (offline by default: no
account needed; ``wandb.mode=online`` after ``wandb login`` to sync, ``wandb.mode=disabled`` for
none). Only rank 0 reports anything.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt.atomic import atomic_write
from gpt.config import TrainRunConfig
from gpt.ranks import Ranks
from gpt.runs.metrics import json_safe, parse_record


class Throughput:
    """Token positions run and wall time since the last log line; evals and saves restart it, so
    they never count as training time."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.t0, self.steps, self.positions = time.time(), 0, 0

    def add(self, positions: int) -> None:
        self.steps, self.positions = self.steps + 1, self.positions + positions

    def take(self, world_size: int) -> tuple[float, float]:
        """(seconds per step, tokens per second over all ranks), then restart."""
        elapsed = max(time.time() - self.t0, 1e-9)
        result = elapsed / max(self.steps, 1), self.positions * world_size / elapsed
        self.restart()
        return result


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Monitor:
    def __init__(
        self,
        cfg: TrainRunConfig,
        info: Ranks,
        out_dir: Path,
        resume_step: int | None,
        config: dict[str, Any],
    ):
        self.active = info.is_main
        self.cfg = cfg
        self.bar: Any = _NoBar()
        self.metrics_path = out_dir / "metrics.jsonl"
        self.wandb_run = None
        if not self.active:
            return
        self._reset_metrics(resume_step)
        if cfg.wandb.mode != "disabled":
            self.wandb_run = _start_wandb(cfg, out_dir, config)

    def _reset_metrics(self, resume_step: int | None, keep_events: bool = False) -> None:
        """A fresh run starts an empty file; a resumed run drops records past its checkpoint
        (evals that ran after the last save are replayed, identically), and a torn last line (a
        crash mid-write); a rollback also keeps the guard's events past it."""
        keep: list[dict[str, Any]] = []
        if resume_step is not None and self.metrics_path.exists():
            for line in self.metrics_path.read_text(errors="replace").splitlines():
                record = parse_record(line)
                if record is not None and (
                    record.get("step", 0) <= resume_step or (keep_events and "event" in record)
                ):
                    keep.append(record)
        atomic_write(self.metrics_path, "".join(_dumps(r) + "\n" for r in keep))

    def rolled_back(self, step: int) -> None:
        """After a rollback to ``step``: evals past it belong to the abandoned stretch."""
        if self.active:
            self._reset_metrics(step, keep_events=True)

    def info(self, message: str) -> None:
        if self.active:
            self._write(message)

    def _write(self, message: str) -> None:
        if isinstance(self.bar, _NoBar):
            print(message, flush=True)
        else:
            tqdm.write(message, file=sys.stdout)

    def progress(self, total: int, initial: int):
        """A progress bar on stderr when it is a terminal (log files stay clean)."""
        if self.active and self.cfg.train.progress and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
        return self.bar

    def step_line(
        self, step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, mfu: float, dt: float
    ) -> None:
        if not self.active:
            return
        self._write(
            f"step {step:>6}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"mfu {100 * mfu:.1f}% | {1000 * dt:.1f} ms/step"
        )
        if self.wandb_run is not None:
            self.wandb_run.log(
                {"train/loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu}, step=step
            )

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.metrics_path, "a") as f:
            f.write(_dumps(record) + "\n")
        val = record.get("val_loss")
        # val_bpb and task scores (``cloze/acc``...) when the run computes them
        extra = {k: v for k, v in record.items() if (k == "val_bpb" or "/" in k) and v is not None}
        self._write(
            f"eval step {record['step']}: train_loss {record['train_loss']:.4f}"
            + (f" | val_loss {val:.4f}" if val is not None else "")
            + "".join(
                f" | {k} {record[k]:.3f}" for k in ("train_reward_acc", "val_reward_acc") if k in record
            )
            + "".join(f" | {k} {v:.4f}" for k, v in extra.items())
            + f" | {record['elapsed_s']:.0f}s"
        )
        if self.wandb_run is not None:
            # the losses, any other eval metric (DPO's val_reward_acc, val_bpb) and task scores, under eval/
            logged = {f"eval/{k}": v for k, v in record.items() if k.startswith(("train_", "val_"))}
            logged.update({f"eval/{k}": v for k, v in extra.items()})
            self.wandb_run.log(
                {**logged, "eval/val_loss": val, "tokens": record["tokens"]}, step=record["step"]
            )

    def event(self, record: dict[str, Any], message: str) -> None:
        """A guard event (a skipped step, a rollback, ...): console, metrics.jsonl, wandb."""
        if not self.active:
            return
        with open(self.metrics_path, "a") as f:
            f.write(_dumps(record) + "\n")
        self._write(message)
        if self.wandb_run is not None:
            numbers = {
                f"guard/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
            }
            # wandb steps only go forward: a rollback is logged at the step that failed
            step = record.get("from_step", record["step"])
            self.wandb_run.log({**numbers, f"guard/{record['event']}": 1}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _dumps(record: dict[str, Any]) -> str:
    """Strict JSON (no bare NaN/Infinity): non-finite numbers as strings, see gpt.runs.metrics."""
    return json.dumps(json_safe(record), allow_nan=False)


def _start_wandb(cfg: TrainRunConfig, out_dir: Path, config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        print("notice: wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(
            project=cfg.wandb.project,
            name=cfg.wandb.name or out_dir.name,
            entity=cfg.wandb.entity,
            mode=cfg.wandb.mode,
            dir=str(out_dir),
            config=config,
            resume="allow" if cfg.resume else None,
        )
    except Exception as e:  # no API key for online mode, no network, ...
        print(
            f"notice: wandb could not start ({str(e).splitlines()[0][:160]}); "
            "logging to metrics.jsonl only (wandb.mode=offline needs no account)",
            file=sys.stderr,
        )
        return None
