"""A tiny random model and its char tokenizer, in memory and as a checkpoint directory, for the
evaluation tests; a tiny chat model tuned for a moment on given dialogs (the DPO and GRPO tests' base)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt.checkpoint import CKPT_NAME, checkpoint_state, save_checkpoint
from gpt.config import TrainRunConfig
from gpt.model import GPT, GPTConfig, pad_vocab
from gpt.tokenizer import char_tokenizer
from gpt.train.loop import train

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;?!'-\n0123456789()[]{}\"#|/"


def tiny_model(block_size: int = 16, seed: int = 0, tokenizer=None):
    """(model in eval mode, char tokenizer) with random weights large enough to be non-uniform."""
    tok = tokenizer or char_tokenizer([ALPHABET])
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=pad_vocab(tok.vocab_size), n_layer=2, n_head=2,
                       n_embd=32, bias=False, norm="rmsnorm", pos_emb="rope")  # fmt: skip
    model = GPT(config)
    with torch.no_grad():  # sharper predictions than the init's: scores differ visibly between choices
        model.lm_head.weight.mul_(20)
    return model.eval(), tok


def save_run(directory: Path, model: GPT, tok) -> Path:
    """Write ``directory/ckpt.pt`` as a training run would (weights, shape, tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / CKPT_NAME, checkpoint_state(model.state_dict(), model.config, tok.to_state()))
    return directory


def write_jsonl(path: Path, records: list) -> None:
    """One JSON object per line (a str record is written as it is: a malformed line on purpose)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def tiny_sft_run(directory: Path, dialogs: list[list[dict]], block_size: int) -> Path:
    """A 1-layer char chat model SFT-trained 3 steps on ``dialogs`` (message lists): ``directory/sft``."""
    path = directory / "dialogs.jsonl"
    write_jsonl(path, [{"messages": d} for d in dialogs])
    train(TrainRunConfig.from_dict({
        "out_dir": str(directory / "sft"), "seed": 1, "device": "cpu",
        "model": dict(block_size=block_size, n_layer=1, n_head=2, n_embd=32, bias=False, norm="rmsnorm",
                      pos_emb="rope"),
        "data": dict(name="d", format="dialogs", path=str(path), tokenizer="char", val_fraction=0.0),
        "train": dict(max_steps=3, batch_size=4, eval_interval=0, log_interval=3, ckpt_interval=0,
                      progress=False, peak_flops=1e12, dtype="fp32"),
        "wandb": dict(mode="disabled"),
    }))  # fmt: skip
    return directory / "sft"
