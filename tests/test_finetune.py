"""Fine-tuning a Hugging Face GPT-2 on new text: the imported model's val loss on that text goes down,
its tokenizer is reused (never rebuilt from the data), block_size may shrink but never grow, and the
README's commands (train.py experiment=finetune with LoRA, gpt merge, gpt export, sampling)
work end to end."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_hf import bytes_to_unicode

from gpt.checkpoint import load_checkpoint
from gpt.commands.export import export_main, merge_main
from gpt.commands.train import train_main
from gpt.errors import CheckpointError
from gpt.infer.sample import sample
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.typed_config import REPO_ROOT

transformers = pytest.importorskip("transformers")

GPT2_SHAPE = dict(bias=True, norm="layernorm", pos_emb="learned", block_size=32)


def write_small_vocab(directory: Path) -> int:
    """A byte-level BPE pair in GPT-2's format with a few merges (keeps the model small and the
    tests fast; test_hf.py covers GPT-2's full vocabulary). Returns the vocabulary size."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("e", "r")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 2-layer GPT2LMHeadModel (save_pretrained) with its tokenizer files."""
    directory = tmp_path_factory.mktemp("hf_small")
    n_vocab = write_small_vocab(directory)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=n_vocab)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(directory))
    return directory


def test_finetuning_an_imported_model_lowers_its_val_loss(make_cfg, hf_dir):
    cfg = make_cfg(
        init_from=f"hf:{hf_dir}",
        model=GPT2_SHAPE,  # block_size 32 of the model's 64 positions
        data=dict(tokenizer="char"),  # ignored: the model's own tokenizer prepares the data
        train=dict(max_steps=20, eval_interval=10, keep_best=True),
    )
    train(cfg)
    records = read_metrics(cfg.out_dir)
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    state = load_checkpoint(cfg.out_dir)
    assert state["tokenizer"]["kind"] == "hf" and state["model_config"]["block_size"] == 32
    saved = json.loads(Path(cfg.out_dir, "tokenizer.json").read_text(encoding="utf-8"))
    assert len(saved["mergeable_ranks"]) == 256 + 5  # the model's own, not one trained on the text
    best = load_checkpoint(Path(cfg.out_dir, "best.pt"))
    assert best["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in records), abs=1e-5)


def test_finetune_preset_sets_the_finetuning_defaults():
    from gpt.commands.cli import compose_config
    from gpt.commands.train import TRAIN
    from gpt.config import TrainRunConfig

    composed, _ = compose_config(TRAIN, ["experiment=finetune", "init_from=x", "train.max_steps=7"])
    cfg = TrainRunConfig.from_dict(composed)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.eval_interval) == (1e-4, 20, 50)
    assert cfg.train.keep_best and cfg.out_dir == "out/finetune" and cfg.model.n_layer is None
    assert cfg.train.max_steps == 7  # the command line still wins


def test_block_size_may_shrink_but_never_grow(make_cfg, hf_dir):
    with pytest.raises(
        CheckpointError, match=r"model.block_size=128 is larger than the 64 positions.*may only shrink"
    ):
        train(make_cfg(init_from=f"hf:{hf_dir}", model={**GPT2_SHAPE, "block_size": 128}))


def test_readme_commands_lora_finetune_merge_export_and_sample(tmp_path, corpus, hf_dir, capsys):
    run, merged, exported = tmp_path / "ft", tmp_path / "merged", tmp_path / "hf"
    cmd = [
        sys.executable, "train.py", "experiment=finetune", f"init_from=hf:{hf_dir}", "data=text",
        f"data.path={corpus}", "finetune.method=lora", "optim.lr=1e-3", "model.block_size=32",
        f"out_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "device=cpu", "wandb.mode=disabled",
        "train.max_steps=4", "train.eval_interval=2", "train.eval_steps=1", "train.batch_size=4",
        "train.peak_flops=1e12",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LoRA: rank 8" in done.stdout + done.stderr
    state = load_checkpoint(run)
    assert state["config"]["experiment"] == "finetune" and "lora" in state
    assert (run / "best.pt").exists()

    out = io.StringIO()
    sample({"ckpt": str(run), "prompt": "ROMEO:", "max_new_tokens": 8, "temperature": 0.0, "device": "cpu"},
           out=out, err=io.StringIO())  # fmt: skip
    assert out.getvalue().startswith("ROMEO:")

    merge_main([f"ckpt={run}", f"out={merged}"])
    export_main([f"ckpt={merged}", f"out={exported}"])
    capsys.readouterr()
    loaded = load(run)
    model, tokenizer = loaded.build(), loaded.tokenizer  # unmerged adapters
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(exported)).eval()
    idx = torch.tensor([tokenizer.encode("ROMEO: But soft, what light")])
    with torch.no_grad():
        ours, theirs = model.eval()(idx)[..., : tokenizer.vocab_size], ref(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_init_from_takes_the_shape_from_the_checkpoint_without_a_preset(tmp_path, corpus, hf_dir, capsys):
    """`train.py init_from=hf:DIR data=text data.path=FILE`: the default model preset's shape does not
    count as given; a shape key typed on the command line still must match the checkpoint."""
    common = [
        f"init_from=hf:{hf_dir}", "data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'c'}",
        "device=cpu", "wandb.mode=disabled", "train.max_steps=2", "train.eval_interval=0",
        "train.batch_size=2", "train.peak_flops=1e12", "train.log_interval=1",
    ]  # fmt: skip
    train_main([*common, f"out_dir={tmp_path / 'a'}", "model.block_size=32"])
    shape = load_checkpoint(tmp_path / "a")["model_config"]
    assert (shape["n_layer"], shape["n_embd"], shape["block_size"], shape["norm"]) == (2, 32, 32, "layernorm")
    with pytest.raises(SystemExit) as exit_info:
        train_main([*common, f"out_dir={tmp_path / 'b'}", "model.n_layer=4"])
    assert exit_info.value.code == 2
    assert "model.n_layer=4 (checkpoint: 2)" in capsys.readouterr().err
