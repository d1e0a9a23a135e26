"""Export a checkpoint to a Hugging Face GPT-2 directory that ``transformers`` loads as is, and fold
a LoRA run's adapters into a plain checkpoint.

    gpt export ckpt=out/finetune out=out/finetune-hf
    gpt export ckpt=out/finetune/best.pt out=out/best-hf overwrite=true check=true
    gpt merge ckpt=out/finetune out=out/merged

Export writes config.json and model.safetensors (plus vocab.json, merges.txt and
tokenizer_config.json when the tokenizer is GPT-2's byte-level BPE), so that

    from transformers import GPT2LMHeadModel, GPT2Tokenizer
    model = GPT2LMHeadModel.from_pretrained("out/finetune-hf")

gives the same logits as ours. LoRA checkpoints are merged first. Models outside the GPT-2 family
(rotary positions, RMSNorm) are refused with the list of options that cannot be exported.
``check=true`` loads the result with ``transformers`` (if installed) and compares logits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import CKPT_NAME, checkpoint_path, checkpoint_state, save_checkpoint
from gpt.commands.cli import Command, main
from gpt.errors import ConfigError
from gpt.interop.hf import export_hf
from gpt.runs.load import load_model

EXPORT = Command(
    "export",
    usage="gpt export ckpt=RUN_DIR_OR_FILE out=HF_DIR [overwrite=true] [check=true]",
    free_text=("ckpt", "out"),
)
MERGE = Command(
    "merge",
    usage="gpt merge ckpt=RUN_DIR_OR_FILE out=OUT_DIR [overwrite=true]",
    free_text=("ckpt", "out"),
)


def check_with_transformers(model, out_dir: Path) -> float:
    """Load ``out_dir`` with transformers and return the largest logit difference from ``model`` on
    a fixed sequence (over the exported vocabulary)."""
    from transformers import GPT2LMHeadModel  # optional: the [hf] extra

    ref = GPT2LMHeadModel.from_pretrained(str(out_dir)).eval()
    n_vocab = ref.config.vocab_size
    idx = torch.arange(min(16, model.config.block_size)).unsqueeze(0) * 7 % n_vocab  # (1, T)
    model.eval()
    with torch.no_grad():
        ours = model(idx)[..., :n_vocab]
        theirs = ref(idx).logits
    return (ours - theirs).abs().max().item()


def export(ckpt: str, out: str, overwrite: bool = False, check: bool = False) -> list[Path]:
    """Load ``ckpt`` (LoRA adapters merged) and write ``out``; returns the files written."""
    model, tokenizer, _ = load_model(ckpt, merge=True)
    files = export_hf(model, tokenizer, out, overwrite=overwrite)
    print(f"exported {ckpt} to {out}: {', '.join(f.name for f in files)}")
    if not any(f.name == "vocab.json" for f in files):
        print(
            f"note: the tokenizer ({tokenizer.kind}) is not GPT-2's byte-level BPE, so no Hugging Face "
            f"tokenizer files were written; its ids are described by {Path(ckpt)}'s tokenizer.json",
            file=sys.stderr,
        )
    if check:
        diff = check_with_transformers(model, Path(out))
        print(f"check: transformers' logits differ from ours by at most {diff:.2e}")
    return files


def merge_checkpoint(ckpt: str, out: str, overwrite: bool = False) -> Path:
    """Write ``out/ckpt.pt`` (and tokenizer.json): the LoRA checkpoint ``ckpt`` with its adapters
    folded into the base weights, a plain checkpoint that needs no base model."""
    model, tokenizer, state = load_model(ckpt, merge=True)
    if "lora" not in state:
        raise ConfigError(f"{checkpoint_path(ckpt)} has no LoRA adapters: there is nothing to merge")
    target = Path(out).expanduser()
    target = target if target.suffix == ".pt" else target / CKPT_NAME
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another out or set overwrite=true")
    merged = checkpoint_state(
        model.state_dict(),
        model.config,
        state["tokenizer"],
        optimizer=None,  # a starting point (init_from), not a run to resume
        step=state.get("step", 0),
        tokens=state.get("tokens", 0),
        config=state.get("config", {}),
        best_val_loss=state.get("best_val_loss"),
    )
    save_checkpoint(target, merged)
    tokenizer.save(target.parent)
    return target


def export_job(cfg: dict[str, Any]) -> list[Path]:
    return export(cfg["ckpt"], cfg["out"], bool(cfg["overwrite"]), bool(cfg["check"]))


def merge_job(cfg: dict[str, Any]) -> Path:
    target = merge_checkpoint(cfg["ckpt"], cfg["out"], bool(cfg["overwrite"]))
    print(f"merged the LoRA adapters of {cfg['ckpt']} into {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def export_main(argv: Sequence[str] | None = None) -> list[Path]:
    return main(export_job, EXPORT, argv)


def merge_main(argv: Sequence[str] | None = None) -> Path:
    return main(merge_job, MERGE, argv)

