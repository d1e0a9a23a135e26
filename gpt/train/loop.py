"""The one training loop: pretraining, fine-tuning and instruction tuning differ only in their data
and their initial weights, never in the loop.

    from gpt.config import TrainRunConfig
    from gpt.train.loop import train
    summary = train(TrainRunConfig.from_dict({...}))

Per optimizer step: ``batch_size`` sequences (global) are split over processes and micro-steps of
``micro_batch_size``; gradients are accumulated without all-reduce until the last micro-step, the
global gradient norm is clipped, and the optimizer steps with the learning rate of ``lr_at(step)``.
Every ``eval_interval`` steps (and at the end) train and val losses (and ``val_bpb``, and the scores
of ``train.eval_tasks``) go to ``metrics.jsonl`` and wandb; a checkpoint is written every
``ckpt_interval`` steps, at the end, and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import BEST_NAME, CKPT_NAME, save_checkpoint
from gpt.config import TrainRunConfig
from gpt.data.shards import TokenWindows
from gpt.device import autocast_for, measure_peak_flops, resolve_dtype
from gpt.errors import ConfigError
from gpt.eval.bpb import TextConfig, bytes_per_token
from gpt.eval.tasks import TasksConfig, TaskSuite
from gpt.train import distributed as D
from gpt.train.optim import configure_optimizer, lr_at
from gpt.train.setup import RunSetup, setup_run
from gpt.train.signals import StopFlag


def split_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum_steps) for a global batch over world_size processes."""
    if batch_size <= 0 or batch_size % world_size:
        lower = batch_size // world_size * world_size
        nearest = " or ".join(str(v) for v in (lower, lower + world_size) if v > 0)
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split evenly over {world_size} processes; "
            f"use a multiple of {world_size}, e.g. {nearest}"
        )
    per_rank = batch_size // world_size
    mbs = micro_batch_size or per_rank
    if mbs <= 0 or per_rank % mbs:
        divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        raise ConfigError(
            f"train.micro_batch_size={mbs} does not divide the {per_rank} sequences per process "
            f"(train.batch_size={batch_size} over {world_size} processes); valid values: {divisors}"
        )
    return mbs, per_rank // mbs


@torch.no_grad()
def estimate_loss(model, source, cfg: TrainRunConfig, info: D.DistInfo, mbs: int, autocast) -> float:
    """Mean loss per target token over eval_steps global batches of fixed windows (the same at
    every eval, so the curve is not noisy), the same whatever the number of processes and the
    micro-batch size: each rank adds up its tokens' losses, then the ranks add up their sums."""
    was_training = model.training
    model.eval()
    # (sum of token losses, tokens); float64 where the device has it (Apple's MPS does not)
    acc_dtype = torch.float32 if info.device.type == "mps" else torch.float64
    total = torch.zeros(2, dtype=acc_dtype, device=info.device)
    for i in range(cfg.train.eval_steps):
        for start in D.micro_batch_starts(cfg.train.batch_size, mbs, info):
            x, y = source.get(i, cfg.train.batch_size, start, mbs)
            n_targets = int((y != -1).sum())
            with autocast:
                loss = model(x.to(info.device), y.to(info.device))  # mean over the micro-batch's targets
            if n_targets:  # none: the mean is nan (the forward still runs: FSDP gathers weights in it)
                total[0] += loss.to(acc_dtype) * n_targets
                total[1] += n_targets
    if info.enabled:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def task_suite(cfg: TrainRunConfig) -> TaskSuite:
    """The tasks of train.eval_tasks; cloze items come from the held-out split of the run's corpus."""
    text = None
    if cfg.data.format == "text" and cfg.data.val_fraction > 0:
        text = TextConfig(path=cfg.data.path, jsonl_field=cfg.data.jsonl_field, split="val",
                          val_fraction=cfg.data.val_fraction)  # fmt: skip
    return TaskSuite(cfg.train.eval_tasks, TasksConfig(tasks=list(cfg.train.eval_tasks)), text)


def try_compile(model, run_step: Callable[[Any], Any], info: D.DistInfo):
    """torch.compile with a graceful fallback: compile errors surface on the first call, so run one
    step with the compiled model and fall back to eager (one notice line) if it fails."""
    compiled = torch.compile(model)
    try:
        run_step(compiled)
        return compiled
    except Exception as e:  # missing compiler, unsupported op, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        D.print0(f"notice: torch.compile failed ({msg}); continuing without compilation", info=info)
        return model


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


class Trainer:
    """The state of one run (model, optimizer, step) and what a step, an eval and a save do."""

    def __init__(self, cfg: TrainRunConfig, info: D.DistInfo, run: RunSetup) -> None:
        self.cfg, self.info, self.run = cfg, info, run
        self.mbs, self.accum = split_batch(cfg.train.batch_size, cfg.train.micro_batch_size, info.world_size)
        self.raw_model = run.model
        self.dtype = resolve_dtype(cfg.train.dtype, info.device, key="train.dtype")
        self.autocast = autocast_for(info.device, self.dtype)
        self.model = D.prepare_model(run.model, info, cfg.train, self.dtype)
        self.optimizer = configure_optimizer(self.raw_model, cfg.optim, info.device.type)
        if run.optimizer_state is not None:
            D.load_optimizer_state(self.raw_model, self.optimizer, run.optimizer_state)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        self.step, self.best_val = run.step, run.best_val_loss
        self.starts = D.micro_batch_starts(cfg.train.batch_size, self.mbs, info)  # this rank's micro-batches
        self.flops_per_token = self.raw_model.flops_per_token(run.block_size)
        self.peak = cfg.train.peak_flops or measure_peak_flops(info.device, self.dtype)
        self.meter = Throughput()
        self.t_start = time.time()
        # val_bpb = val_loss in bits x tokens per byte of the val split (text corpora only)
        val = run.val_data
        text = isinstance(val, TokenWindows)
        self.val_bytes_per_token = bytes_per_token(run.tokenizer, val.shards) if text else None
        self.tasks = task_suite(cfg) if cfg.train.eval_tasks else None

    def forward_backward(self, model) -> torch.Tensor:
        """This step's forward/backward over this rank's micro-batches; returns this rank's part of
        the loss (the sum over ranks is the step's loss)."""
        cfg, info = self.cfg, self.info
        batches = [self.run.train_data.get(self.step, cfg.train.batch_size, s, self.mbs) for s in self.starts]
        self.meter.add(sum(x.numel() for x, _ in batches))
        counts = [int((y != -1).sum()) for _, y in batches]  # target tokens per micro-batch
        # the step's loss is the mean over the global batch's target tokens, however it is split:
        # a micro-batch's mean weighs n / total, times world_size as DDP/FSDP average over ranks
        total = max(D.sum_over_ranks(sum(counts), info), 1)
        loss_sum = torch.zeros((), device=info.device)
        for micro, ((x, y), n) in enumerate(zip(batches, counts, strict=True)):
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            with D.no_grad_sync(model, sync=micro == self.accum - 1), self.autocast:
                # no targets at all: a zero loss that still runs every collective of the step
                loss = model(x, y) * (n * info.world_size / total) if n else model(x).float().sum() * 0.0
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            # clip_grad_norm_ on DDP/FSDP2 parameters computes the norm of the global gradient
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self) -> dict[str, Any]:
        """Train and val loss on fixed batches, logged; keeps best.pt if asked."""
        cfg, run = self.cfg, self.run
        train_loss = estimate_loss(self.model, run.train_eval, cfg, self.info, self.mbs, self.autocast)
        val_loss = (
            estimate_loss(self.model, run.val_data, cfg, self.info, self.mbs, self.autocast)
            if run.val_data
            else float("nan")
        )
        bpt = self.val_bytes_per_token
        record = {
            "step": self.step,
            "tokens": self.step * cfg.train.batch_size * run.block_size,
            "train_loss": round(train_loss, 6),
            "val_loss": round(val_loss, 6) if not math.isnan(val_loss) else None,
            "val_bpb": round(val_loss / math.log(2) / bpt, 6) if bpt and not math.isnan(val_loss) else None,
            "lr": lr_at(max(self.step - 1, 0), cfg.optim, cfg.train.max_steps),
            "elapsed_s": round(time.time() - self.t_start, 3),
        }
        if self.tasks is not None:  # on every rank, the same items: FSDP's weight gathers match
            with torch.no_grad(), self.autocast:
                scores = self.tasks.score(self.raw_model, run.tokenizer, chat=cfg.data.format == "dialogs")
            record.update({f"{task}/{k}": v for task, r in scores.items() for k, v in r["metrics"].items()})
        run.logger.metrics(record)
        better = self.best_val is None or val_loss < self.best_val
        if cfg.train.keep_best and not math.isnan(val_loss) and better:
            self.best_val = val_loss
            self.save(Path(cfg.out_dir) / BEST_NAME)
        self.meter.restart()
        return record

    def save(self, path: Path) -> None:
        """Every rank takes part (FSDP gathers the shards, RNG states are collected); rank 0 writes,
        and the others wait for it, so that no rank exits (and has torchrun stop rank 0) mid-write."""
        state = self.run.checkpoint_state(self.raw_model, self.optimizer, self.step, self.best_val)
        if self.info.is_main:
            save_checkpoint(path, state)
        D.barrier()
        self.meter.restart()

    def log(self, loss: torch.Tensor, lr: float) -> None:
        loss_val = D.all_reduce_mean(loss.detach().float()).item()
        dt, tokens_per_s = self.meter.take(self.info.world_size)
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.info.world_size)
        self.run.logger.step_line(self.step, self.cfg.train.max_steps, loss_val, lr, tokens_per_s, mfu, dt)

    def due(self, interval: int) -> bool:
        """Whether an every-``interval``-steps action (eval, save) falls on this step; always at the end."""
        return interval > 0 and (self.step % interval == 0 or self.step == self.cfg.train.max_steps)

    def fit(self, stop: StopFlag, should_stop: Callable[[int], bool] | None) -> dict[str, Any]:
        """Train from ``self.step`` to ``train.max_steps``, or until a stop; returns the summary."""
        cfg, info, out_dir = self.cfg, self.info, Path(self.cfg.out_dir)
        if cfg.train.compile:
            self.model = try_compile(self.model, self.forward_backward, info)
            self.optimizer.zero_grad(set_to_none=True)  # the trial step's gradients are discarded
        record = self.evaluate() if self.step == 0 and cfg.train.eval_interval > 0 else {}
        self.model.train()
        self.meter.restart()
        bar = self.run.logger.progress(total=cfg.train.max_steps, initial=self.step)
        while self.step < cfg.train.max_steps:
            lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
            loss = self.forward_backward(self.model)
            self.optimizer_step(lr)
            self.step += 1
            bar.update(1)
            if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.max_steps:
                self.log(loss, lr)
            # ranks may see a signal (or should_stop) at different steps: they stop together at the first
            code = D.max_over_ranks(stop.code() or int(bool(should_stop and should_stop(self.step))), info)
            if code:  # a stop: save first, so that a kill during the eval below loses nothing
                self.save(out_dir / CKPT_NAME)
            if self.due(cfg.train.eval_interval):
                record = self.evaluate()
            if not code and (self.due(cfg.train.ckpt_interval) or self.step == cfg.train.max_steps):
                self.save(out_dir / CKPT_NAME)
            if code:
                self.run.logger.close()
                D.print0(
                    f"stopped at step {self.step}; continue with resume=true out_dir={out_dir}", info=info
                )
                if code in StopFlag.REASONS:
                    sys.exit(130 if StopFlag.REASONS[code] == "SIGINT" else 143)
                return {**record, "step": self.step, "interrupted": True}
        summary = {
            **record,
            "step": self.step,
            "elapsed_s": round(time.time() - self.t_start, 3),
            "rank": info.rank,
        }
        if info.device.type == "cuda":
            summary["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2)
            self.run.logger.info(f"peak GPU memory: {summary['peak_mem_GiB']} GiB (rank 0)")
        self.run.logger.close()
        return summary


def train(cfg: TrainRunConfig, should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) one training job; returns a summary of the final step's metrics.
    ``should_stop(step)`` lets Python callers interrupt the run as Ctrl-C would."""
    info = D.init_distributed(cfg.device, cfg.train.timeout_s)
    try:
        with StopFlag() as stop:
            run = setup_run(cfg, info)
            return Trainer(cfg, info, run).fit(stop, should_stop)
    finally:
        D.teardown()
