"""A tiny random model and its char tokenizer, in memory and as a checkpoint directory, for the
evaluation tests."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt.checkpoint import CKPT_NAME, checkpoint_state, save_checkpoint
from gpt.model import GPT, GPTConfig, pad_vocab
from gpt.tokenizer import char_tokenizer

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
