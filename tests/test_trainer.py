"""The training loop end to end on tiny CPU runs: loss goes down, run directory contents, exact
resume, save/load fidelity, init_from, and the run-directory safety rules."""

import json

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.errors import CheckpointError, ConfigError
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train


def test_tiny_run_lowers_the_loss_and_fills_the_run_directory(make_cfg):
    cfg = make_cfg()
    summary = train(cfg)
    records = read_metrics(cfg.out_dir)
    assert [r["step"] for r in records] == [0, 10, 20, 30]
    for r in records:
        assert {"step", "tokens", "train_loss", "val_loss", "lr", "elapsed_s"} <= set(r)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    assert records[-1]["tokens"] == 30 * 8 * 32
    assert summary["step"] == 30
    out = cfg.out_dir
    for name in ("ckpt.pt", "config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert torch.os.path.exists(f"{out}/{name}"), name
    state = load_checkpoint(out)
    assert state["step"] == 30 and state["optimizer"] is not None and "torch" in state["rng"]


def test_save_then_load_gives_identical_logits(make_cfg):
    cfg = make_cfg(train=dict(max_steps=5, eval_interval=0))
    train(cfg)
    loaded = load(cfg.out_dir)
    model, tokenizer = loaded.build(), loaded.tokenizer
    idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    # retrain deterministically to the same point and compare against the in-memory weights
    from gpt.model import GPT, GPTConfig

    state = load_checkpoint(cfg.out_dir)
    fresh = GPT(GPTConfig.from_dict(state["model_config"]))
    fresh.load_state_dict(state["model"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), fresh(idx))
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= tokenizer.vocab_size


def test_interrupted_and_resumed_equals_uninterrupted(make_cfg):
    full = make_cfg("full", model=dict(dropout=0.1), train=dict(micro_batch_size=4))
    train(full)
    part = make_cfg("part", model=dict(dropout=0.1), train=dict(micro_batch_size=4))
    summary = train(part, should_stop=lambda step: step == 13)
    assert summary["stopped"] == "requested" and summary["step"] == 13
    assert load_checkpoint(part.out_dir)["step"] == 13
    resumed = make_cfg("part", model=dict(dropout=0.1), train=dict(micro_batch_size=4), resume=True)
    train(resumed)
    a, b = read_metrics(full.out_dir), read_metrics(part.out_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"], (ra, rb)


def test_gradient_accumulation_matches_one_big_batch(make_cfg):
    one = make_cfg("one", train=dict(max_steps=6, eval_interval=3))
    acc = make_cfg("acc", train=dict(max_steps=6, eval_interval=3, micro_batch_size=2))
    train(one), train(acc)
    for ra, rb in zip(read_metrics(one.out_dir), read_metrics(acc.out_dir)):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)


def test_existing_checkpoint_is_never_overwritten_without_consent(make_cfg):
    cfg = make_cfg(train=dict(max_steps=3, eval_interval=0))
    train(cfg)
    before = (torch.os.path.getmtime(f"{cfg.out_dir}/ckpt.pt"), open(f"{cfg.out_dir}/ckpt.pt", "rb").read())
    with pytest.raises(ConfigError, match="resume=true"):
        train(cfg)
    assert open(f"{cfg.out_dir}/ckpt.pt", "rb").read() == before[1]


def test_resume_without_checkpoint_is_an_error(make_cfg):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(make_cfg(resume=True))


def test_init_from_reuses_weights_and_tokenizer_and_checks_shape(make_cfg, tmp_path):
    base = make_cfg("base", train=dict(max_steps=20, eval_interval=0))
    train(base)
    tuned = make_cfg(
        "tuned", init_from=base.out_dir, model={"block_size": 16}, train=dict(max_steps=2, eval_interval=1)
    )
    train(tuned)
    first = read_metrics(tuned.out_dir)[0]
    assert first["val_loss"] < 3.9  # trained weights, not ln(65) ~ 4.17 (59 chars + 6 specials)
    assert json.loads(open(f"{tuned.out_dir}/tokenizer.json").read()) == json.loads(
        open(f"{base.out_dir}/tokenizer.json").read()
    )
    with pytest.raises(CheckpointError, match="n_layer"):
        train(make_cfg("bad", init_from=base.out_dir, model={"n_layer": 3}))
    with pytest.raises(CheckpointError, match="block_size"):
        train(make_cfg("bad2", init_from=base.out_dir, model={"block_size": 64}))


def test_corrupt_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("clip", [0.05, 1e6, float("inf")])
def test_clip_gradients_equals_clip_grad_norm_bit_for_bit(clip):
    """Clipped (0.05), unclipped (1e6) and off (inf): the same norm and the same gradients as
    clip_grad_norm_, although the unclipped ones skip the multiply; NaN gradients stay NaN."""
    from gpt.model import GPT, GPTConfig
    from gpt.train.optim import clip_gradients

    def model_with_grads(poison: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
        x = torch.randint(0, 32, (2, 8))
        m(x, x).backward()
        if poison:
            next(m.parameters()).grad.view(-1)[0] = float("nan")
        return m

    for poison in (False, True):
        ours, ref = model_with_grads(poison), model_with_grads(poison)
        norm = clip_gradients(ours, clip, foreach=True)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip, foreach=True)
        assert torch.equal(norm, ref_norm) or (poison and norm.isnan() and ref_norm.isnan())
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
        if poison:  # a NaN norm's factor is NaN: every gradient NaN, as clip_grad_norm_ leaves them
            assert all(p.grad.isnan().all() for p in ours.parameters())
