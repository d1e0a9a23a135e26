"""Evaluation inside the training loop, one for every objective: the means of the objective's
metrics over fixed batches of train and val (the LM loss; DPO's loss, reward accuracy, margin and
log-probs), ``val_bpb`` on text, and the tasks of ``train.eval_tasks``. It gives the same numbers
whatever the number of processes and the micro-batch size, and can be abandoned on a stop.

    evaluator = Evaluator(cfg, info, run, mbs, autocast, objective)
    record, val_loss = evaluator(model, raw_model, step, lr, t_start)   # the metrics.jsonl record
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from gpt.config import TrainRunConfig
from gpt.data.shards import TokenWindows
from gpt.eval.bpb import TextConfig, bytes_per_token
from gpt.eval.tasks import TasksConfig, TaskSuite
from gpt.ranks import Ranks
from gpt.train import distributed as D
from gpt.train.setup import RunSetup


class EvalInterrupted(Exception):
    """A stop (SIGINT/SIGTERM) arrived during an eval, which was abandoned."""


@torch.no_grad()
def evaluate_objective(model, source, cfg: TrainRunConfig, info: Ranks, mbs: int, autocast,
                       objective, abort: Callable[[], int] | None = None) -> dict[str, float]:  # fmt: skip
    """The means of ``objective.metrics`` over the items (target tokens, or pairs) of eval_steps
    global batches of fixed windows (the same at every eval, so the curve is not noisy): each rank
    adds up its items' values, then the ranks add up their sums. ``abort()`` true on any rank (a
    stop signal) abandons the eval: EvalInterrupted."""
    was_training = model.training
    model.eval()
    # (sums of the metrics..., items); float64 where the device has it (Apple's MPS does not)
    acc_dtype = torch.float32 if info.device.type == "mps" else torch.float64
    total = torch.zeros(len(objective.metrics) + 1, dtype=acc_dtype, device=info.device)
    for i in range(cfg.train.eval_steps):
        for start in D.micro_batch_starts(cfg.train.batch_size, mbs, info):
            if abort is not None and info.max([int(bool(abort()))])[0]:
                model.train(was_training)
                raise EvalInterrupted
            with autocast:
                sums, n = objective.eval_sums(model, source.get(i, cfg.train.batch_size, start, mbs),
                                              info.device, acc_dtype)  # fmt: skip
            total[:-1] += sums
            total[-1] += n
    if info.enabled:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    means = {k: (total[j] / total[-1]).item() for j, k in enumerate(objective.metrics)}
    for k in [k for k in means if k.endswith("_sq")]:  # a mean of squares becomes the std of its base
        base = k.removesuffix("_sq")
        means[f"{base}_std"] = math.sqrt(max(means.pop(k) - means[base] ** 2, 0.0))
    return means


class Evaluator:
    """What an eval of the run measures, on every rank alike (FSDP's weight gathers must match)."""

    def __init__(
        self, cfg: TrainRunConfig, info: Ranks, run: RunSetup, mbs: int, autocast, objective
    ) -> None:
        self.cfg, self.run, self.args = cfg, run, (cfg, info, mbs, autocast, objective)
        self.autocast = autocast
        # val_bpb = val_loss in bits x tokens per byte of the val split (text corpora only)
        val = run.val_data
        self.val_bytes_per_token = (
            bytes_per_token(run.tokenizer, val.shards) if isinstance(val, TokenWindows) else None
        )
        self.tasks = task_suite(cfg, run.tokenizer) if cfg.train.eval_tasks else None

    def __call__(self, model, raw_model, step: int, lr: float, t_start: float,
                 abort: Callable[[], int] | None = None) -> tuple[dict[str, Any], float]:  # fmt: skip
        """(the eval's record for metrics.jsonl, the val loss (NaN: no val split)) at ``step``;
        ``abort()`` true (a stop signal) abandons it: ({}, NaN)."""
        cfg, run = self.cfg, self.run
        sources = {"train": run.train_eval, "val": run.val_data}
        try:
            parts = {split: evaluate_objective(model, source, *self.args, abort)
                     for split, source in sources.items() if source is not None}  # fmt: skip
        except EvalInterrupted:
            return {}, math.nan
        val_loss, bpt = parts.get("val", {}).get("loss", math.nan), self.val_bytes_per_token
        record = {
            "step": step,
            "tokens": step * cfg.train.batch_size * run.block_size,
            "train_loss": round(parts["train"]["loss"], 6),
            "val_loss": round(val_loss, 6) if run.val_data else None,  # null: no val split; NaN stays NaN
            "val_bpb": round(val_loss / math.log(2) / bpt, 6) if bpt and run.val_data else None,
            # DPO's reward accuracy, margin, log-probs; GRPO's reward, accuracy, KL, reply length
            **{f"{p}_{k}": round(v, 6) for p, m in parts.items() for k, v in m.items() if k != "loss"},
            "lr": lr,
            "elapsed_s": round(time.time() - t_start, 3),
        }
        if self.tasks is not None:
            with torch.no_grad(), self.autocast:
                scores = self.tasks.score(raw_model, run.tokenizer, chat=cfg.data.format == "dialogs")
            record.update({f"{task}/{k}": v for task, r in scores.items() for k, v in r["metrics"].items()})
        return record, val_loss


def task_suite(cfg: TrainRunConfig, tokenizer) -> TaskSuite:
    """The tasks of train.eval_tasks; cloze items come from the held-out split of the run's corpus."""
    text = None
    if cfg.data.format == "text" and cfg.data.val_fraction > 0:
        text = TextConfig(path=cfg.data.path, jsonl_field=cfg.data.text_field, split="val",
                          val_fraction=cfg.data.val_fraction, cache_dir=cfg.data.cache_dir)  # fmt: skip
    return TaskSuite(cfg.train.eval_tasks, TasksConfig(tasks=list(cfg.train.eval_tasks)), text, tokenizer)
