"""Evaluation inside the training loop: the mean loss of fixed batches (any objective), the
preference metrics of DPO runs, and the tasks of ``train.eval_tasks``. All of it gives the same
numbers whatever the number of processes and the micro-batch size, and can be abandoned on a stop.

    loss = estimate_loss(model, source, cfg, info, mbs, autocast)   # mean per target token
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpt.config import TrainRunConfig
from gpt.eval.bpb import TextConfig
from gpt.eval.tasks import TasksConfig, TaskSuite
from gpt.train import distributed as D
from gpt.train.objective import make_objective


class EvalInterrupted(Exception):
    """A stop (SIGINT/SIGTERM) arrived during an eval, which was abandoned."""


@torch.no_grad()
def estimate_loss(
    model,
    source,
    cfg: TrainRunConfig,
    info: D.DistInfo,
    mbs: int,
    autocast,
    objective=None,
    abort: Callable[[], int] | None = None,
) -> float:
    """Mean loss per target token over eval_steps global batches of fixed windows (the same at
    every eval, so the curve is not noisy), the same whatever the number of processes and the
    micro-batch size: each rank adds up its tokens' losses, then the ranks add up their sums.
    ``abort()`` true on any rank (a stop signal) abandons the eval: EvalInterrupted."""
    objective = objective or make_objective(cfg)
    was_training = model.training
    model.eval()
    # (sum of token losses, tokens); float64 where the device has it (Apple's MPS does not)
    acc_dtype = torch.float32 if info.device.type == "mps" else torch.float64
    total = torch.zeros(2, dtype=acc_dtype, device=info.device)
    for i in range(cfg.train.eval_steps):
        for start in D.micro_batch_starts(cfg.train.batch_size, mbs, info):
            if abort is not None and D.max_over_ranks(int(bool(abort())), info):
                model.train(was_training)
                raise EvalInterrupted
            batch = source.get(i, cfg.train.batch_size, start, mbs)
            n_targets = objective.count(batch)
            with autocast:
                loss = objective.loss(model, batch, info.device)  # mean over the micro-batch's targets
            if n_targets:  # none: the mean is nan (the forward still runs: FSDP gathers weights in it)
                total[0] += loss.to(acc_dtype) * n_targets
                total[1] += n_targets
    if info.enabled:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


@torch.no_grad()
def estimate_pair_metrics(model, source, cfg: TrainRunConfig, info: D.DistInfo, mbs: int, autocast,
                          objective, abort: Callable[[], int] | None = None) -> dict[str, float]:  # fmt: skip
    """The preference metrics (``objective.metrics``: loss, reward accuracy, margin, log-probs),
    means over the pairs of eval_steps fixed global batches, summed over ranks; ``abort`` as for
    estimate_loss."""
    was_training = model.training
    model.eval()
    acc_dtype = torch.float32 if info.device.type == "mps" else torch.float64
    total = torch.zeros(len(objective.metrics) + 1, dtype=acc_dtype, device=info.device)  # sums, pairs
    for i in range(cfg.train.eval_steps):
        for start in D.micro_batch_starts(cfg.train.batch_size, mbs, info):
            if abort is not None and D.max_over_ranks(int(bool(abort())), info):
                model.train(was_training)
                raise EvalInterrupted
            with autocast:
                _, per_pair = objective.pair_metrics(model, source.get(i, cfg.train.batch_size, start, mbs),
                                                     info.device)  # fmt: skip
            total[:-1] += torch.stack([per_pair[k].to(acc_dtype).sum() for k in objective.metrics])
            total[-1] += per_pair["loss"].numel()
    if info.enabled:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return {k: (total[j] / total[-1]).item() for j, k in enumerate(objective.metrics)}


def task_suite(cfg: TrainRunConfig) -> TaskSuite:
    """The tasks of train.eval_tasks; cloze items come from the held-out split of the run's corpus."""
    text = None
    if cfg.data.format == "text" and cfg.data.val_fraction > 0:
        text = TextConfig(path=cfg.data.path, jsonl_field=cfg.data.text_field, split="val",
                          val_fraction=cfg.data.val_fraction)  # fmt: skip
    return TaskSuite(cfg.train.eval_tasks, TasksConfig(tasks=list(cfg.train.eval_tasks)), text)
