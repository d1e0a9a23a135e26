"""Export a checkpoint to a Hugging Face GPT-2 directory that ``transformers`` loads as is.

    python -m gpt.export ckpt=out/finetune out=out/finetune-hf
    python -m gpt.export ckpt=out/finetune/best.pt out=out/best-hf overwrite=true check=true

Writes config.json and model.safetensors (plus vocab.json, merges.txt and tokenizer_config.json when
the tokenizer is GPT-2's byte-level BPE), so that

    from transformers import GPT2LMHeadModel, GPT2Tokenizer
    model = GPT2LMHeadModel.from_pretrained("out/finetune-hf")

gives the same logits as ours. LoRA checkpoints are merged first. Models outside the GPT-2 family
(rotary positions, RMSNorm) are refused with the list of options that cannot be exported.
``check=true`` loads the result with ``transformers`` (if installed) and compares logits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gpt.errors import ConfigError

USAGE = "python -m gpt.export ckpt=RUN_DIR_OR_FILE out=HF_DIR [overwrite=true] [check=true]"


def parse_args(argv: list[str], keys: dict[str, Any], usage: str) -> dict[str, Any]:
    """``key=value`` (or ``--key value`` / ``--key=value``) arguments against ``keys`` (name -> default;
    None = required, a bool default makes a true/false flag). ConfigError naming the key otherwise."""
    args, items = dict(keys), list(argv)
    while items:
        item = items.pop(0)
        if item in ("-h", "--help"):
            raise ConfigError(f"usage: {usage}")
        key, eq, value = item.removeprefix("--").partition("=")
        if not eq and item.startswith("--") and items:
            value, eq = items.pop(0), "="
        if key not in keys or not eq:
            raise ConfigError(f"unexpected argument {item!r}; usage: {usage}")
        if isinstance(keys[key], bool):
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{key}={value!r} must be true or false")
            args[key] = value.lower() == "true"
        else:
            args[key] = value
    missing = [k for k, v in args.items() if v is None]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    return args


def check_with_transformers(model, out_dir: Path) -> float:
    """Load ``out_dir`` with transformers and return the largest logit difference from ``model`` on
    a fixed sequence (over the exported vocabulary)."""
    import torch
    from transformers import GPT2LMHeadModel

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
    from gpt.checkpoint import load_model
    from gpt.hf import export_hf

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


def main(argv: list[str] | None = None) -> None:
    from gpt.cli import run

    argv = sys.argv[1:] if argv is None else argv
    keys = {"ckpt": None, "out": None, "overwrite": False, "check": False}
    run(lambda _: export(**parse_args(argv, keys, USAGE)), {})


if __name__ == "__main__":
    main()
