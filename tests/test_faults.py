"""Faults inside a long run, each tried for real on tiny CPU runs: NaN gradients (skipped, rolled
back, given up on), loss spikes, damaged checkpoints, torn or non-finite metrics, exact resume and
changed settings on resume. Around the run (its directory, kills, several ranks, data preparation,
signals): test_faults_process.py. docs/faults.md lists them.

    pytest tests/test_faults.py tests/test_faults_process.py -m "not slow"   # the fast subset (CI)
"""

import json
import math
import re
import zipfile

import pytest
import torch
from helpers_faults import assert_finite_checkpoints, poison, strict_lines, weights

from gpt.checkpoint import history, load_checkpoint, load_latest, save_checkpoint
from gpt.commands.cli import run
from gpt.commands.train import train_job
from gpt.errors import CheckpointError, ConfigError
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.train.signals import Stop

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ 1. the guard


def test_a_nan_gradient_is_skipped_logged_and_never_saved(make_cfg):
    cfg = make_cfg(train=dict(max_steps=20, ckpt_interval=5))
    summary = train(cfg, after_backward=poison({7}))
    assert summary["step"] == 20
    events = [r for r in read_metrics(cfg.out_dir, events=True) if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("skipped", 7)]
    assert math.isfinite(events[0]["loss"])  # the loss was finite: the gradient was not
    assert "non-finite" in events[0]["reason"]
    assert_finite_checkpoints(cfg.out_dir)
    strict_lines(cfg.out_dir)
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == [0, 10, 20]


def test_nan_steps_in_a_row_roll_back_past_the_bad_batches_and_the_run_finishes(make_cfg):
    cfg = make_cfg(train=dict(max_steps=30, ckpt_interval=10, max_bad_steps=2, rollback_lr_factor=0.5))
    summary = train(cfg, after_backward=poison({15, 16}, times=2))
    assert summary["step"] == 30
    events = [r for r in read_metrics(cfg.out_dir, events=True) if "event" in r]
    assert [e["event"] for e in events] == ["skipped", "rollback"]
    rollback = events[1]
    assert (rollback["step"], rollback["from_step"], rollback["data_offset"]) == (10, 16, 7)
    assert rollback["lr_scale"] == 0.5
    # the evals of the abandoned stretch are gone: one record per eval step
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == [0, 10, 20, 30]
    state = load_checkpoint(cfg.out_dir)
    assert state["step"] == 30 and state["guard"]["data_offset"] == 7 and state["guard"]["rollbacks"] == 0
    assert_finite_checkpoints(cfg.out_dir)


def test_rollbacks_that_do_not_help_stop_the_run_with_the_good_checkpoint_intact(make_cfg):
    cfg = make_cfg(train=dict(max_steps=30, ckpt_interval=0, max_bad_steps=2, max_rollbacks=2))
    summary = train(cfg, after_backward=poison(set(range(5, 30))))
    assert summary["stopped"] is Stop.DIVERGED
    assert re.search("2 rollbacks did not help.*intact", summary["failure"])
    state = load_checkpoint(cfg.out_dir)
    assert state["step"] == 0  # the one written before the first step
    assert_finite_checkpoints(cfg.out_dir)
    events = [r["event"] for r in read_metrics(cfg.out_dir, events=True) if "event" in r]
    assert events.count("rollback") == 2 and events[-1] == "diverged"
    strict_lines(cfg.out_dir)


def test_a_huge_learning_rate_stops_the_run_and_never_writes_non_finiteweights(make_cfg, capsys):
    cfg = make_cfg(
        optim=dict(lr=1e4, warmup_steps=1), train=dict(max_steps=30, ckpt_interval=5, max_rollbacks=1)
    )
    with pytest.raises(SystemExit) as exc:  # what train.py does: one error line, exit status 2
        run(train_job, cfg.to_dict())
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exc.value.code == 2 and len(error) == 1 and "diverged" in error[0] and "lower optim.lr" in error[0]
    assert_finite_checkpoints(cfg.out_dir)
    strict_lines(cfg.out_dir)


def test_a_loss_spike_rolls_back(make_cfg):
    state = {"done": False}

    def blow_up(step, model):  # scale the weights once: the next step's loss jumps
        if step == 14 and not state["done"]:
            state["done"] = True
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(8.0)

    cfg = make_cfg(train=dict(max_steps=20, ckpt_interval=10, spike_std=6.0, spike_window=4))
    assert train(cfg, after_backward=blow_up)["step"] == 20
    rollbacks = [r for r in read_metrics(cfg.out_dir, events=True) if r.get("event") == "rollback"]
    assert len(rollbacks) == 1 and "spike" in rollbacks[0]["reason"] and rollbacks[0]["step"] == 10
    evals = read_metrics(cfg.out_dir)
    assert evals[-1]["train_loss"] < evals[-2]["train_loss"]  # training went on from the good weights


# ------------------------------------------------------------------------ 2. history, checksums


def _flip_tensor_byte(path) -> None:
    """Flip one byte inside the largest tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(open(path, "rb").read())
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[offset] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_keep_last_rolls_and_a_flipped_byte_falls_back_to_the_previous_checkpoint(make_cfg, capsys):
    cfg = make_cfg(train=dict(max_steps=20, ckpt_interval=5, keep_last=3, eval_interval=0))
    train(cfg)
    names = [p.name for p in history(cfg.out_dir)]
    assert names == ["ckpt.pt", "ckpt-0000015.pt", "ckpt-0000010.pt"]
    assert [load_checkpoint(p)["step"] for p in history(cfg.out_dir)] == [20, 15, 10]
    newest = history(cfg.out_dir)[0]
    _flip_tensor_byte(newest)
    torch.load(newest, weights_only=True)  # torch's reader does not notice
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(newest)
    warnings = []
    state, used = load_latest(cfg.out_dir, warn=warnings.append)
    assert used.name == "ckpt-0000015.pt" and state["step"] == 15
    assert len(warnings) == 1 and "damaged" in warnings[0]
    capsys.readouterr()
    train(make_cfg(train=dict(max_steps=25, ckpt_interval=5, keep_last=3, eval_interval=0), resume=True))
    err = capsys.readouterr()
    assert "damaged" in err.err and "resuming" in err.out and "ckpt-0000015.pt at step 15" in err.out
    assert load_checkpoint(cfg.out_dir)["step"] == 25


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(
            tmp_path / "ckpt.pt", {"model": {"w": torch.tensor([1.0, float("nan")])}}, check_finite=True
        )
    assert not (tmp_path / "ckpt.pt").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- 3. strict metrics


def test_metrics_are_strict_json_and_a_nan_val_loss_is_not_null(make_cfg):
    cfg = make_cfg(train=dict(max_steps=10, eval_interval=5))
    train(cfg, after_backward=poison({3}))
    records = strict_lines(cfg.out_dir)
    assert all(r["val_loss"] is not None for r in records if "event" not in r)
    from gpt.runs.metrics import json_safe, parse_record

    line = json.dumps(json_safe({"step": 1, "val_loss": float("nan"), "lr": float("inf")}), allow_nan=False)
    back = parse_record(line)
    assert math.isnan(back["val_loss"]) and back["lr"] == math.inf


# ------------------------------------------------------------------------------ 4-7. exact resume


def test_resume_with_dropout_and_the_measured_peak_flops_is_bit_exact(make_cfg):
    kw = dict(model=dict(dropout=0.2), train=dict(max_steps=12, eval_interval=6, peak_flops=None))
    train(make_cfg("full", **kw))
    part = make_cfg("part", **kw)
    train(part, should_stop=lambda step: step == 5)
    train(make_cfg("part", resume=True, **kw))
    a, b = weights(make_cfg("full", **kw).out_dir), weights(part.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_numbers_drawn_before_the_first_step_do_not_change_the_run(make_cfg):
    """What train.compile's trial step does (a forward/backward, dropout masks drawn) after the RNG
    is restored: undone before the first step, so a resumed run cannot drift."""
    from gpt.ranks import Ranks
    from gpt.train.loop import Trainer
    from gpt.train.setup import setup_run
    from gpt.train.signals import StopFlag

    cpu = torch.device("cpu")

    def weights_after(name: str, consume: bool) -> dict:
        cfg = make_cfg(name, model=dict(dropout=0.2), train=dict(max_steps=4, eval_interval=0))
        info = Ranks(device=cpu)
        trainer = Trainer(cfg, info, setup_run(cfg, info))
        if consume:
            trainer.forward_backward(trainer.model)
            trainer.optimizer.zero_grad(set_to_none=True)
            torch.rand(100)
        with StopFlag() as stop:
            trainer.fit(stop, None)
        return weights(cfg.out_dir)

    a, b = weights_after("plain", False), weights_after("drawn", True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_grad_scaler_state_travels_in_the_checkpoint(make_cfg):
    from gpt.ranks import Ranks
    from gpt.train.loop import Trainer
    from gpt.train.setup import setup_run

    cfg = make_cfg(train=dict(max_steps=2, eval_interval=0))
    info = Ranks(device=torch.device("cpu"))
    run = setup_run(cfg, info)
    trainer = Trainer(cfg, info, run)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    trainer.save(trainer.run.logger.metrics_path.parent / "ckpt.pt")
    saved = load_checkpoint(cfg.out_dir)["scaler"]
    assert saved["scale"] == 1024.0 and saved["growth_interval"] == 7
    run.scaler_state = saved
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(run.scaler_state)
    assert restored.get_scale() == 1024.0


def test_resume_refuses_changed_settings_unless_forced(make_cfg, capsys):
    train(make_cfg(train=dict(max_steps=4, eval_interval=0)))
    changed = dict(
        train=dict(max_steps=6, eval_interval=0, batch_size=4), optim=dict(lr=1e-3, warmup_steps=5)
    )
    with pytest.raises(
        ConfigError,
        match=r"optim.lr=0.001 \(checkpoint: 0.003\).*batch_size=4 \(checkpoint: 8\).*resume_force",
    ):
        train(make_cfg(resume=True, seed=8, **changed))
    with pytest.raises(ConfigError, match="seed=8"):
        train(make_cfg(resume=True, seed=8, train=dict(max_steps=6, eval_interval=0)))
    # longer, other intervals: allowed
    assert train(make_cfg(resume=True, train=dict(max_steps=6, eval_interval=3, log_interval=2)))["step"] == 6
    capsys.readouterr()
    assert train(make_cfg(resume=True, resume_force=True, seed=8, **changed))["step"] == 6
    assert "resume_force=true" in capsys.readouterr().out
    summary = train(make_cfg(resume=True, train=dict(max_steps=6, eval_interval=0)))
    assert summary["stopped"] is Stop.DONE and "already finished" in capsys.readouterr().out


def test_a_torn_last_metrics_line_does_not_break_resume(make_cfg):
    cfg = make_cfg(train=dict(max_steps=10, eval_interval=5, ckpt_interval=5))
    train(cfg, should_stop=lambda step: step == 5)
    with open(f"{cfg.out_dir}/metrics.jsonl", "ab") as f:
        f.write(b'{"step": 6, "train_lo' + b"\x00" * 64)
    train(make_cfg(resume=True, train=dict(max_steps=10, eval_interval=5, ckpt_interval=5)))
    assert [r["step"] for r in strict_lines(cfg.out_dir)] == [0, 5, 10]
