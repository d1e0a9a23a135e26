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

Each step reads top to bottom in ``Trainer.fit``: the step, then ``maybe_rollback``, ``maybe_stop``,
``maybe_eval`` and ``maybe_save`` each decide for themselves; ``fit`` returns why the run stopped
(``gpt.train.signals.Stop``) and the command maps that to an exit status.

The guard (``gpt.train.guard``): a step whose loss or gradient norm is non-finite on any rank is
skipped by every rank; too many in a row, or a loss spike, roll the run back to its last good
checkpoint, past the batches that failed; when rollbacks do not help the run stops (Stop.DIVERGED)
with that checkpoint intact. A checkpoint with non-finite weights is never written
(``gpt.train.checkpoints`` writes them and reads them back). The run directory is locked for the run
(``gpt.train.rundir``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import BEST_NAME, CKPT_NAME, history
from gpt.config import TrainRunConfig
from gpt.device import autocast_for, keep_freed_memory, measure_peak_flops, resolve_dtype
from gpt.errors import ConfigError
from gpt.ranks import Ranks
from gpt.train import distributed as D
from gpt.train import sharded as S
from gpt.train.checkpoints import Checkpoints
from gpt.train.evaluation import Evaluator
from gpt.train.grpo import GRPOObjective
from gpt.train.guard import Guard
from gpt.train.memory import check_memory, planned
from gpt.train.monitor import Throughput
from gpt.train.objective import make_objective
from gpt.train.optim import clip_gradients, configure_optimizer, lr_at
from gpt.train.rewards import Rewards
from gpt.train.rundir import claim_out_dir
from gpt.train.setup import RunSetup, setup_run
from gpt.train.signals import AGREED, Interrupted, Stop, StopFlag

# a test hook: after_backward(step, model) may poison a gradient (see tests/test_faults.py)
AfterBackward = Callable[[int, torch.nn.Module], None]


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


def try_compile(model, run_step: Callable[[Any], Any], info: Ranks):
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


class Trainer:
    """The state of one run (model, optimizer, step) and what a step, an eval and a save do."""

    def __init__(
        self,
        cfg: TrainRunConfig,
        info: Ranks,
        run: RunSetup,
        after_backward: AfterBackward | None = None,
    ) -> None:
        # the random state setup restored (or seeded): nothing below (the peak-FLOPs probe, the compile
        # trial step's dropout) may consume it before the first step, see fit
        self.rng = D.rng_snapshot(info.device)
        self.cfg, self.info, self.run = cfg, info, run
        self.after_backward = after_backward
        self.raw_model = run.model
        self.dtype = resolve_dtype(cfg.train.dtype, info.device, key="train.dtype")
        # train.device_memory: the planner picks the micro-batch and activation checkpointing
        train_cfg, why = planned(cfg.train, run.model.config, info.world_size, info.device, self.dtype)
        if why:
            run.logger.info(f"plan: {why}")
        self.mbs, self.accum = split_batch(cfg.train.batch_size, train_cfg.micro_batch_size, info.world_size)
        self.autocast = autocast_for(info.device, self.dtype)
        weights = "fp32 weights, " if self.dtype != torch.float32 else ""
        run.logger.info(f"precision: {str(self.dtype).removeprefix('torch.')} ({weights}train.dtype="
                        f"{cfg.train.dtype}); optimizer: {cfg.optim.name}")  # fmt: skip
        check_memory(run.model.config, self.mbs, self.dtype, info.device, train_cfg.activation_checkpointing)
        self.model = D.prepare_model(run.model, info, train_cfg, self.dtype)
        self.optimizer = configure_optimizer(self.raw_model, cfg.optim, info.device.type)
        if run.optimizer_state is not None:
            D.load_optimizer_state(self.raw_model, self.optimizer, run.optimizer_state)
        if run.shards is not None:  # each rank reads the slices of its own shards
            read = S.load_sharded(run.shards, self.raw_model, self.optimizer)
            run.logger.info(f"resumed {run.shards.name}: this rank read {sum(read.values()) / 2**20:.1f} MiB "
                            f"from {len(read)} of its files")  # fmt: skip
        # LM cross-entropy, DPO on preference pairs, or GRPO on rewards (its rollouts: objective_state)
        grpo = cfg.data.format == "prompts"
        self.objective = (GRPOObjective(cfg, run.model, run.tokenizer, run.step) if grpo
                          else make_objective(cfg))  # fmt: skip
        if grpo:
            self.objective.load_state(run.objective_state)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        if run.scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(run.scaler_state)
        self.guard = Guard(cfg.train, run.guard_state)
        self.checkpoints = Checkpoints(cfg, info, run, self.optimizer)  # one file or each rank's shards
        self.step, self.best_val = run.step, run.best_val_loss
        self.starts = D.micro_batch_starts(cfg.train.batch_size, self.mbs, info)  # this rank's micro-batches
        self.flops_per_token = self.raw_model.flops_per_token(run.block_size)
        self.peak = cfg.train.peak_flops or measure_peak_flops(info.device, self.dtype)
        self.meter = Throughput()
        # clipping with foreach kernels: one norm over all gradients, not a Python loop (the CPU default)
        self.clip_foreach = info.device.type in ("cpu", "cuda")
        self.t_start = time.time()
        self.evaluator = Evaluator(cfg, info, run, self.mbs, self.autocast, self.objective)
        self.record: dict[str, Any] = {}  # the last eval's
        self.stopped: Stop | None = None  # set by a stop (maybe_stop) or a divergence (rollback)
        self.failure = ""  # why the run diverged
        self.bar: Any = None  # the progress bar, from start()

    def forward_backward(self, model) -> torch.Tensor:
        """This step's forward/backward over this rank's micro-batches; returns this rank's part of
        the loss (the sum over ranks is the step's loss)."""
        cfg, info = self.cfg, self.info
        index = self.step + self.guard.data_offset  # past the batches a rollback skipped
        batches = [self.run.train_data.get(index, cfg.train.batch_size, s, self.mbs) for s in self.starts]
        self.meter.add(sum(b[0].numel() for b in batches))
        counts = [self.objective.count(b) for b in batches]  # target tokens (or pairs) per micro-batch
        # the step's loss is the mean over the global batch's target tokens, however it is split:
        # a micro-batch's mean weighs n / total, times world_size as DDP/FSDP average over ranks
        total = max(info.sum([sum(counts)])[0], 1)
        loss_sum = torch.zeros((), device=info.device)
        for micro, (batch, n) in enumerate(zip(batches, counts, strict=True)):
            with D.no_grad_sync(model, sync=micro == self.accum - 1), self.autocast:
                # no targets at all: a zero loss that still runs every collective of the step
                if n:
                    loss = self.objective.loss(model, batch, info.device) * (n * info.world_size / total)
                else:
                    loss = self.objective.zero_loss(model, batch, info.device)
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def optimizer_step(self, lr: float, loss: torch.Tensor) -> tuple[str, float]:
        """Step the optimizer unless the guard says otherwise; returns (verdict, the step's loss)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group runs at muon_lr
        if self.after_backward is not None:
            self.after_backward(self.step, self.raw_model)
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = clip_gradients(self.raw_model, clip, foreach=self.clip_foreach)
        # non-finite gradients under fp16 are the GradScaler's overflows: it skips and lowers its scale
        bad = ~torch.isfinite(loss) | (~torch.isfinite(norm) & (not self.scaler.is_enabled()))
        # one all-reduce: (sum over ranks of the loss parts = the loss x world size, ranks that saw a fault)
        flags = torch.stack([loss.detach().float().reshape(()), bad.float().reshape(()).to(loss.device)])
        if self.info.enabled:
            torch.distributed.all_reduce(flags)
        loss_sum, bad_ranks = flags.tolist()
        loss_val = loss_sum / self.info.world_size
        verdict = self.guard.check(loss_val, bad_ranks > 0)
        if verdict == "ok":
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return verdict, loss_val

    def evaluate(self, abort: Callable[[], int] | None = None) -> dict[str, Any]:
        """An eval (see ``gpt.train.evaluation``), logged; keeps best.pt if asked. ``abort()`` true (a
        stop signal) abandons it: nothing logged, {} returned."""
        lr = lr_at(max(self.step - 1, 0), self.cfg.optim, self.cfg.train.max_steps) * self.guard.lr_scale
        record, val_loss = self.evaluator(self.model, self.raw_model, self.step, lr, self.t_start, abort)
        if record:
            self.run.logger.metrics(record)
            better = self.best_val is None or val_loss < self.best_val
            if self.cfg.train.keep_best and not math.isnan(val_loss) and better:
                self.best_val = val_loss
                self.save(Path(self.cfg.out_dir) / BEST_NAME)
        self.meter.restart()
        return record

    def save(self, path: Path) -> bool:
        """A checkpoint of the run and of the trainer's own state (the guard's, the scaler's, GRPO's
        rollouts), written by ``gpt.train.checkpoints`` (every rank takes part). Returns False
        (nothing written) when the weights are not finite."""
        extra: dict[str, Any] = {"guard": self.guard.state()}
        if self.scaler.is_enabled():
            extra["scaler"] = self.scaler.state_dict()
        if hasattr(self.objective, "state"):  # GRPO's rollouts in use
            extra["objective"] = self.objective.state()
        written = self.checkpoints.save(path, self.step, self.best_val, extra)
        if written and path.name == CKPT_NAME:
            self.guard.saved(self.step)
        self.meter.restart()
        return written

    def rollback(self, reason: str) -> None:
        """Back to the newest good checkpoint (weights, optimizer, RNG, scaler), past the batches that
        failed, at a lower LR if asked; logged, and saved at once so that a resume continues from
        here. Once ``train.max_rollbacks`` rollbacks in a row did not help, the run stops instead
        (``self.stopped``: Stop.DIVERGED, ``self.failure`` says why)."""
        cfg, failed = self.cfg, self.step
        if self.guard.rollbacks >= cfg.train.max_rollbacks:
            self.stopped = Stop.DIVERGED
            self.failure = self.checkpoints.give_up(failed, reason, self.guard.rollbacks)
            return
        state, used = self.checkpoints.restore()
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val = int(state["step"]), state.get("best_val_loss")
        if hasattr(self.objective, "load_state"):
            self.objective.load_state(state.get("objective"))
        D.restore_rng(state.get("rng", {}), self.info, cfg.seed, self.step)
        self.guard.rolled_back(failed, self.step, state.get("guard"))
        g = self.guard
        record = {"step": self.step, "event": "rollback", "from_step": failed, "reason": reason,
                  "data_offset": g.data_offset, "lr_scale": g.lr_scale, "rollback": g.rollbacks}  # fmt: skip
        self.run.logger.rolled_back(self.step)
        self.run.logger.event(
            record,
            f"step {failed}: {reason}; rolled back to {used.name} (step {self.step}), skipping "
            f"{g.data_offset} batches, lr x{g.lr_scale:g} (rollback {g.rollbacks}/{cfg.train.max_rollbacks})",
        )
        self.save(Path(cfg.out_dir) / CKPT_NAME)

    def due(self, interval: int) -> bool:
        """Whether an every-``interval``-steps action (eval, save) falls on this step; always at the end."""
        return interval > 0 and (self.step % interval == 0 or self.step == self.cfg.train.max_steps)

    # ------------------------------------------------------------------ one step of fit, in order
    def train_step(self) -> str:
        """One optimizer step (or a skipped one, logged), counted; returns the guard's verdict: a
        "rollback" step is not counted (see maybe_rollback)."""
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps) * self.guard.lr_scale
        loss = self.forward_backward(self.model)
        verdict, loss_val = self.optimizer_step(lr, loss)
        if verdict == "rollback":
            return verdict
        if verdict == "skip":
            self.run.logger.event(
                {"step": self.step, "event": "skipped", "loss": loss_val, "reason": self.guard.reason},
                f"step {self.step}: skipped, {self.guard.reason} (loss {loss_val:.4g})",
            )
        self.step += 1
        self.bar.update(1)
        if self.step % self.cfg.train.log_interval == 0 or self.step == self.cfg.train.max_steps:
            self.log(loss, lr)
        return verdict

    def log(self, loss: torch.Tensor, lr: float) -> None:
        loss_val = D.all_reduce_mean(loss.detach().float()).item()
        dt, tokens_per_s = self.meter.take(self.info.world_size)
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.info.world_size)
        self.run.logger.step_line(self.step, self.cfg.train.max_steps, loss_val, lr, tokens_per_s, mfu, dt)

    def maybe_rollback(self, verdict: str) -> bool:
        """After a step the guard refused (``train.max_bad_steps`` bad steps in a row, a loss spike):
        back to the last good checkpoint, or stop (Stop.DIVERGED). Returns whether it did."""
        if verdict != "rollback":
            return False
        self.rollback(self.guard.reason)
        self.meter.restart()
        return True

    def maybe_stop(self, stop: StopFlag, should_stop: Callable[[int], bool] | None = None) -> None:
        """A signal (or ``should_stop``) stops the run after this step. Ranks may see one at different
        steps: they agree (one all-reduce) and stop together at the first; the checkpoint is written at
        once, so that a kill during the eval that may follow loses nothing."""
        code = stop.code() or int(bool(should_stop and should_stop(self.step)))
        self.stopped = AGREED[self.info.max([code])[0]]
        if self.stopped is not None:
            self.save(Path(self.cfg.out_dir) / CKPT_NAME)

    def maybe_eval(self, stop: StopFlag) -> None:
        """Every ``train.eval_interval`` steps and at the end; a signal abandons it and stops the run."""
        if not self.due(self.cfg.train.eval_interval):
            return
        self.record = self.evaluate(stop.code) or self.record
        if self.stopped is None:
            self.maybe_stop(stop)

    def maybe_save(self) -> None:
        """Every ``train.ckpt_interval`` steps and at the end (a stop saved already); weights that are
        not finite are never written: the run rolls back instead."""
        due = self.due(self.cfg.train.ckpt_interval) or self.step == self.cfg.train.max_steps
        if self.stopped is None and due and not self.save(Path(self.cfg.out_dir) / CKPT_NAME):
            self.rollback("non-finite weights")

    def start(self) -> None:
        """Before the first step: compile, restore the random state, write a checkpoint to roll back
        to, and the step-0 eval."""
        cfg, out_dir = self.cfg, Path(self.cfg.out_dir)
        if cfg.train.compile:
            self.model = try_compile(self.model, self.forward_backward, self.info)
            self.optimizer.zero_grad(set_to_none=True)  # the trial step's gradients are discarded
        D.rng_restore(self.rng, self.info.device)  # exactly the random state setup left, see __init__
        if self.step == 0 and cfg.train.max_rollbacks > 0 and not history(out_dir):
            self.save(out_dir / CKPT_NAME)  # a good checkpoint to roll back to before the first save
        if self.step == 0 and cfg.train.eval_interval > 0:
            self.record = self.evaluate()  # a signal now stops the run at once (signals.Interrupted)
        self.model.train()
        self.meter.restart()
        self.bar = self.run.logger.progress(total=cfg.train.max_steps, initial=self.step)

    def fit(self, stop: StopFlag, should_stop: Callable[[int], bool] | None = None) -> Stop:
        """Train from ``self.step`` to ``train.max_steps``, or until a stop; returns why it stopped."""
        if self.cfg.resume and self.step >= self.cfg.train.max_steps:
            self.run.logger.info(
                f"the run in {self.cfg.out_dir} already finished: step {self.step} of "
                f"train.max_steps={self.cfg.train.max_steps}; raise train.max_steps to train it further"
            )
            return Stop.DONE
        self.start()
        stop.immediate = False  # from here a stop finishes the step and saves
        while self.step < self.cfg.train.max_steps and self.stopped is None:
            if self.maybe_rollback(self.train_step()):
                continue
            self.maybe_stop(stop, should_stop)
            self.maybe_eval(stop)
            self.maybe_save()
        return self.stopped or Stop.DONE

    def finish(self, stopped: Stop) -> dict[str, Any]:
        """Close the monitor; returns the summary: the last eval's record, the step, why the run
        stopped (and, when it diverged, ``failure``: the message that says what to do)."""
        self.checkpoints.publish()
        summary = {**self.record, "step": self.step, "stopped": stopped, "rank": self.info.rank}
        summary["elapsed_s"] = round(time.time() - self.t_start, 3)
        if stopped is Stop.DIVERGED:
            summary["failure"] = self.failure
        if stopped is Stop.DONE and self.info.device.type == "cuda":
            summary["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(self.info.device) / 2**30, 2)
            self.run.logger.info(f"peak GPU memory: {summary['peak_mem_GiB']} GiB (rank 0)")
        self.run.logger.close()
        if stopped in AGREED:  # a signal or should_stop
            resume = f"continue with resume=true out_dir={self.cfg.out_dir}"
            D.print0(f"stopped at step {self.step}; {resume}", info=self.info)
        return summary


def train(
    cfg: TrainRunConfig,
    should_stop: Callable[[int], bool] | None = None,
    after_backward: AfterBackward | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training job; returns a summary: the last eval's metrics, the step and
    why the run stopped (``"stopped"``: a ``Stop``; the command maps it to an exit status).
    ``should_stop(step)`` lets Python callers interrupt the run as Ctrl-C would; ``after_backward``
    is a test hook (fault injection)."""
    if cfg.data.format == "prompts":  # a reward that does not import: one line before anything loads
        Rewards(cfg.grpo.rewards, cfg.grpo.reward_weights)
    info = D.init_distributed(cfg.device, cfg.train.timeout_s)
    if info.device.type == "cpu":
        keep_freed_memory()  # no page faults on the blocks each step frees and takes back
    try:
        with StopFlag() as stop:
            lock = claim_out_dir(cfg.out_dir, info)  # held by rank 0 for the whole run
            try:
                trainer = Trainer(cfg, info, setup_run(cfg, info), after_backward)
                return trainer.finish(trainer.fit(stop, should_stop))
            finally:
                lock.release()
    except Interrupted as e:  # a signal before the first step: nothing to save
        return {"stopped": e.stop, "rank": info.rank}
    finally:
        D.teardown()
