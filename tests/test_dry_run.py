"""The dry run (gpt.train.dry_run) and the planner (gpt.train.memory.plan): a job of N ranks planned
on this CPU with the fake process group and fake tensors."""

from __future__ import annotations

import re
import time

import pytest
import torch

from gpt.config import TrainRunConfig
from gpt.errors import ConfigError
from gpt.model import GPTConfig
from gpt.train.dry_run import dry_run
from gpt.train.memory import plan

SMALL = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64}


def job(world: int, **train) -> TrainRunConfig:
    return TrainRunConfig.from_dict(
        {"model": SMALL, "train": {"parallel": "fsdp", "dry_run": world, "batch_size": 64, **train}}
    )


def row(report: str, name: str) -> float:
    return float(re.search(rf"\| {re.escape(name)} \| ([0-9.]+)", report).group(1))


def test_dry_run_world_8_prints_per_rank_memory_that_shrinks_with_fsdp():
    t0 = time.time()
    report8 = dry_run(job(8, device_memory="1GiB"))
    assert time.time() - t0 < 30
    assert "rank 0 of 8" in report8 and "tokens/s" in report8 and "planner:" in report8
    report2 = dry_run(job(2, device_memory="1GiB"))
    peak8, peak2 = row(report8, "peak (estimate)"), row(report2, "peak (estimate)")
    assert peak8 <= peak2
    assert not torch.distributed.is_initialized()  # the fake process group is left


def test_fsdp_shards_parameters_exactly():
    from gpt.train import dry_run as module

    big = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 512}
    held = {}
    for world in (2, 8):
        cfg = TrainRunConfig.from_dict({"model": big, "train": {"parallel": "fsdp", "dry_run": world,
                                                                "batch_size": 64}})  # fmt: skip
        held[world] = module.dry_run(cfg)
    assert row(held[8], "parameters (fp32)") < row(held[2], "parameters (fp32)")
    assert row(held[8], "optimizer state") < row(held[2], "optimizer state")


def test_batch_that_does_not_divide_fails_in_one_line():
    with pytest.raises(ConfigError) as e:
        dry_run(job(8, batch_size=60))
    assert "train.batch_size=60" in str(e.value) and "\n" not in str(e.value)


def test_planner_smaller_device_picks_smaller_micro_batch_then_checkpointing():
    config = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    big = plan(config, 64, 80 * 2**30, torch.bfloat16)
    small = plan(config, 64, 16 * 2**30, torch.bfloat16)
    assert small.micro_batch_size < big.micro_batch_size and not big.activation_checkpointing
    tight = plan(config, 64, int(1.2 * 2**30), torch.bfloat16, shards=8)
    assert tight.activation_checkpointing and "activation checkpointing on" in tight.why
    with pytest.raises(ConfigError, match="does not fit"):
        plan(config, 64, 2**30, torch.bfloat16)


def test_a_real_run_takes_the_planners_micro_batch_and_says_why(make_cfg, capsys):
    """train.device_memory on a real (CPU) run: the planner's micro-batch is the one trained with, the
    same losses as that micro-batch given by hand, and a device too small is refused in one line."""
    from gpt.train.loop import train

    # a budget that holds micro-batches of 2 of this model's 64-token rows, not of 4 (the char
    # tokenizer of the test corpus pads its vocabulary to 128)
    shape = dict(block_size=64, n_layer=2, n_head=4, n_embd=256)
    config = GPTConfig(**shape, vocab_size=128, norm="rmsnorm", pos_emb="rope", bias=False)
    budget = plan(config, 8, 2**40, torch.float32, micro_batch_size=2, device=torch.device("cpu")).peak
    budget = int(budget / 0.9) + 1
    planned = train(make_cfg("a", model=shape, train=dict(max_steps=4, device_memory=str(budget),
                                                          eval_interval=4)))  # fmt: skip
    printed = capsys.readouterr()
    assert "plan: micro-batch 2 of 8 sequences per rank" in printed.out + printed.err
    by_hand = train(make_cfg("b", model=shape, train=dict(max_steps=4, micro_batch_size=2, eval_interval=4)))
    assert planned["val_loss"] == by_hand["val_loss"] and planned["train_loss"] == by_hand["train_loss"]
    with pytest.raises(ConfigError, match="does not fit"):
        train(make_cfg("c", model=shape, train=dict(max_steps=1, device_memory="1MiB")))


def test_dry_run_wraps_ddp_and_sizes_the_checkpoint_save_of_either_format():
    """DDP runs through its real wrapper on the fake weights; the save's state dicts are built: FSDP2
    ranks each write their shards (train.checkpoint_format=auto), rank 0 gathers all of it otherwise."""
    big = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 512}
    report = {}
    for parallel, fmt in (("ddp", "auto"), ("fsdp", "auto"), ("fsdp", "single")):
        train = {"parallel": parallel, "dry_run": 8, "batch_size": 64, "checkpoint_format": fmt}
        report[parallel, fmt] = dry_run(TrainRunConfig.from_dict({"model": big, "train": train}))
    full = row(report["ddp", "auto"], "checkpoint save (rank 0 gathers all)")
    ddp = report["ddp", "auto"]
    ddp_state = row(ddp, "parameters (fp32)") + row(ddp, "optimizer state")
    assert full == pytest.approx(ddp_state, abs=0.011)  # the whole model and AdamW state, 2-decimal GiB
    shards = row(report["fsdp", "auto"], "checkpoint save (its shards)")
    assert shards == pytest.approx(full / 8, abs=0.011)
    assert row(report["fsdp", "single"], "checkpoint save (rank 0 gathers all)") == full
    assert not torch.distributed.is_initialized()


def test_ddp_and_fsdp_dry_runs_of_one_model_count_the_same_flops_and_parameters():
    """The tied head and token table are one tensor in either wrapping: the DDP dry run once untied them
    (to_empty gives each module its own tensor), counting the table twice (3.67e9 vs 3.27e9 FLOP)."""
    from gpt.model import GPT

    shape = {"block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 512}
    report = {p: dry_run(TrainRunConfig.from_dict({"model": shape, "train": {"parallel": p, "dry_run": 8,
                                                                             "batch_size": 64}}))
              for p in ("ddp", "fsdp")}  # fmt: skip
    step = {p: re.search(r"step: (\S+) FLOP \((\S+) GFLOP", r).groups() for p, r in report.items()}
    assert step["ddp"] == step["fsdp"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**shape, vocab_size=dry_vocab_of(report["ddp"])))
    assert float(step["ddp"][0]) == pytest.approx(model.flops_per_token() * 64 * 64, rel=5e-3)
    fp32 = 4 * sum(p.numel() for p in model.parameters()) / 2**30  # the tied table once
    assert row(report["ddp"], "parameters (fp32)") == pytest.approx(fp32, abs=0.006)


def dry_vocab_of(report: str) -> int:
    return int(re.search(r"vocab=(\d+)", report).group(1))
