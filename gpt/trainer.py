"""The one training loop: pretraining, fine-tuning and instruction tuning differ only in their data
and their initial weights, never in the loop.

    from gpt.config import TrainRunConfig
    from gpt.trainer import train
    summary = train(TrainRunConfig.from_dict({...}))

Per optimizer step: ``batch_size`` sequences (global) are split over processes and micro-steps of
``micro_batch_size``; gradients are accumulated without all-reduce until the last micro-step, the
global gradient norm is clipped, and AdamW steps with the learning rate of ``lr_at(step)``. Every
``eval_interval`` steps (and at the end) train and val losses go to ``metrics.jsonl`` and wandb; a
checkpoint is written every ``ckpt_interval`` steps, at the end, and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt import distributed as D
from gpt.checkpoint import BEST_NAME, CKPT_NAME, save_checkpoint
from gpt.config import TrainRunConfig
from gpt.errors import ConfigError
from gpt.optim import configure_optimizer, lr_at
from gpt.setup import RunSetup, setup_run


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("train.dtype=fp16 is not supported on the CPU (very slow there); use bf16 or fp32")
    return dtype


def autocast_for(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and exits. A second Ctrl-C
    interrupts at once (a second or more later: under torchrun every worker gets the terminal's
    Ctrl-C and then torchrun's copy of it)."""

    CODES = {"SIGTERM": 2, "SIGINT": 3}  # 1 = should_stop(); all ranks act on the largest code seen

    def __init__(self) -> None:
        self.reason: str | None = None
        self._since = 0.0
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT and time.monotonic() - self._since > 1.0:
            raise KeyboardInterrupt
        if self.reason is None:
            self._since = time.monotonic()
        self.reason = signal.Signals(signum).name
        D.print0(f"\n{self.reason} received: finishing this step, saving a checkpoint, then exiting")

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@torch.no_grad()
def estimate_loss(model, source, cfg: TrainRunConfig, info: D.DistInfo, mbs: int, autocast) -> float:
    """Mean loss per target token over eval_steps global batches of fixed windows (the same at
    every eval, so the curve is not noisy), the same whatever the number of processes and the
    micro-batch size: each rank adds up its tokens' losses, then the ranks add up their sums."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of token losses, tokens)
    for i in range(cfg.train.eval_steps):
        for start in D.micro_batch_starts(cfg.train.batch_size, mbs, info):
            x, y = source.get(i, cfg.train.batch_size, start, mbs)
            n_targets = int((y != -1).sum())
            with autocast:
                loss = model(x.to(info.device), y.to(info.device))  # mean over the micro-batch's targets
            if n_targets:  # none: the mean is nan (the forward still runs: FSDP gathers weights in it)
                total[0] += loss.double() * n_targets
                total[1] += n_targets
    if info.enabled:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def try_compile(model, run_step: Callable[[Any], float], info: D.DistInfo):
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


def train(cfg: TrainRunConfig, should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Run (or resume) one training job; returns a summary of the final step's metrics.
    ``should_stop(step)`` lets Python callers interrupt the run as Ctrl-C would."""
    info = D.init_distributed(cfg.device, cfg.train.timeout_s)
    try:
        with StopFlag() as stop:
            return _train(cfg, info, stop, should_stop)
    finally:
        D.teardown()


def _train(cfg: TrainRunConfig, info: D.DistInfo, stop: StopFlag, should_stop) -> dict[str, Any]:
    t_start = time.time()
    mbs, accum = split_batch(cfg.train.batch_size, cfg.train.micro_batch_size, info.world_size)
    run: RunSetup = setup_run(cfg, info)
    model, raw_model, out_dir = run.model, run.model, Path(cfg.out_dir)
    dtype = resolve_dtype(cfg.train.dtype, info.device)
    autocast = autocast_for(info.device, dtype)
    model = D.prepare_model(model, info, cfg.train, dtype)

    optimizer = configure_optimizer(raw_model, cfg.optim, info.device.type)
    if run.optimizer_state is not None:
        D.load_optimizer_state(raw_model, optimizer, run.optimizer_state)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)
    step, best_val = run.step, run.best_val_loss
    starts = D.micro_batch_starts(cfg.train.batch_size, mbs, info)  # this rank's micro-batches
    tokens_per_step = cfg.train.batch_size * run.block_size
    flops_per_token = raw_model.flops_per_token(run.block_size)
    positions = [0]  # token positions this rank ran since the last log line (dialog rows are shorter)
    peak = cfg.train.peak_flops
    if peak is None:
        from gpt.bench import measure_peak_flops

        peak = measure_peak_flops(info.device, dtype)
    logger = run.logger

    def train_step(m) -> torch.Tensor:
        """One optimizer step's forward/backward over this rank's micro-batches; returns this
        rank's part of the loss (the mean over ranks is the step's loss)."""
        batches = [run.train_data.get(step, cfg.train.batch_size, start, mbs) for start in starts]
        positions[0] += sum(x.numel() for x, _ in batches)
        counts = [int((y != -1).sum()) for _, y in batches]  # target tokens per micro-batch
        # the step's loss is the mean over the global batch's target tokens, however it is split:
        # a micro-batch's mean weighs n / total, times world_size as DDP/FSDP average over ranks
        total = max(D.sum_over_ranks(sum(counts), info), 1)
        loss_sum = torch.zeros((), device=info.device)
        for micro, ((x, y), n) in enumerate(zip(batches, counts, strict=True)):
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            with D.no_grad_sync(m, sync=micro == accum - 1), autocast:
                # no targets at all: a zero loss that still runs every collective of the step
                loss = m(x, y) * (n * info.world_size / total) if n else m(x).float().sum() * 0.0
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    if cfg.train.compile:
        model = try_compile(model, train_step, info)
        optimizer.zero_grad(set_to_none=True)  # the trial step's gradients are discarded

    def evaluate() -> dict[str, Any]:
        nonlocal best_val
        train_loss = estimate_loss(model, run.train_eval, cfg, info, mbs, autocast)
        val_loss = (
            estimate_loss(model, run.val_data, cfg, info, mbs, autocast) if run.val_data else float("nan")
        )
        record = {
            "step": step,
            "tokens": step * tokens_per_step,
            "train_loss": round(train_loss, 6),
            "val_loss": round(val_loss, 6) if not math.isnan(val_loss) else None,
            "lr": lr_at(max(step - 1, 0), cfg.optim, cfg.train.max_steps),
            "elapsed_s": round(time.time() - t_start, 3),
        }
        logger.metrics(record)
        if cfg.train.keep_best and not math.isnan(val_loss) and (best_val is None or val_loss < best_val):
            best_val = val_loss
            save(out_dir / BEST_NAME)
        return record

    def save(path: Path) -> None:
        """Every rank takes part (FSDP gathers the shards, RNG states are collected); rank 0 writes,
        and the others wait for it, so that no rank exits (and has torchrun stop rank 0) mid-write."""
        state = run.checkpoint_state(raw_model, optimizer, step, best_val)
        if info.is_main:
            save_checkpoint(path, state)
        D.barrier()

    record: dict[str, Any] = {}
    if step == 0 and cfg.train.eval_interval > 0:
        record = evaluate()
    model.train()
    t_last, steps_since, positions[0] = time.time(), 0, 0
    bar = logger.progress(total=cfg.train.max_steps, initial=step)
    while step < cfg.train.max_steps:
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model)
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            # clip_grad_norm_ on DDP/FSDP2 parameters computes the norm of the global gradient
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since += 1
        bar.update(1)
        if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
            loss_val = D.all_reduce_mean(loss.detach().float()).item()
            dt = (time.time() - t_last) / steps_since
            tokens_per_s = positions[0] * info.world_size / (dt * steps_since)
            t_last, steps_since, positions[0] = time.time(), 0, 0
            logger.step_line(
                step,
                cfg.train.max_steps,
                loss_val,
                lr,
                tokens_per_s,
                flops_per_token * tokens_per_s / (peak * info.world_size),
                dt,
            )
        # ranks may see a signal (or should_stop) at different steps: they stop together at the first
        local = StopFlag.CODES.get(stop.reason or "", 0) or int(bool(should_stop and should_stop(step)))
        code = D.max_over_ranks(local, info)
        interrupted, reason = code > 0, {2: "SIGTERM", 3: "SIGINT"}.get(code)
        if cfg.train.eval_interval > 0 and (
            step % cfg.train.eval_interval == 0 or step == cfg.train.max_steps
        ):
            record = evaluate()
            t_last, steps_since, positions[0] = time.time(), 0, 0  # eval time is not training throughput
        if (
            step == cfg.train.max_steps
            or interrupted
            or (cfg.train.ckpt_interval > 0 and step % cfg.train.ckpt_interval == 0)
        ):
            save(out_dir / CKPT_NAME)
            t_last, steps_since, positions[0] = time.time(), 0, 0
        if interrupted:
            logger.close()
            D.print0(f"stopped at step {step}; continue with resume=true out_dir={out_dir}", info=info)
            if reason is not None:
                sys.exit(130 if reason == "SIGINT" else 143)
            return {**record, "step": step, "interrupted": True}
    summary = {**record, "step": step, "elapsed_s": round(time.time() - t_start, 3), "rank": info.rank}
    if info.device.type == "cuda":
        summary["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2)
        logger.info(f"peak GPU memory: {summary['peak_mem_GiB']} GiB (rank 0)")
    logger.close()
    return summary
