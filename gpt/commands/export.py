"""Export a checkpoint to a Hugging Face directory that ``transformers`` loads as is, and fold a LoRA
run's adapters into a plain checkpoint.

    gpt export ckpt=out/finetune out=out/finetune-hf
    gpt export ckpt=out/finetune/best.pt out=out/best-hf overwrite=true check=true
    gpt export ckpt=hf:models/SmolLM2-135M out=out/smol-again  # any model reference (gpt.runs.load)
    gpt merge ckpt=out/finetune out=out/merged

Export writes config.json and model.safetensors: GPT2LMHeadModel for learned positions + LayerNorm,
LlamaForCausalLM for rotary + RMSNorm + SwiGLU (Qwen2ForCausalLM with biases on q, k, v only), so that

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/finetune-hf")

gives the same logits as ours. The tokenizer goes along where Hugging Face can express it
(tokenizer.json, or vocab.json + merges.txt for GPT-2's); otherwise one line says it stays ours.
LoRA checkpoints are merged first. A model neither family expresses is refused with every option
that cannot be exported. ``check=true`` loads the result with ``transformers`` and compares logits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gpt.checkpoint import CKPT_NAME, checkpoint_state, save_checkpoint
from gpt.commands.cli import Command, main
from gpt.errors import ConfigError
from gpt.interop.gguf import export_gguf
from gpt.interop.hf import export_hf
from gpt.runs.load import load
from gpt.typed_config import from_dict


@dataclass
class MergeConfig:
    """``gpt merge``: fold a LoRA run's adapters into a plain checkpoint."""

    ckpt: str
    """The model: a run directory, a checkpoint file, a LoRA run (its adapters merged) or hf:DIR;
    merge takes a LoRA run."""
    out: str
    """Where to write: merge, a directory (its ckpt.pt) or a .pt file; export, the Hugging Face
    directory."""
    overwrite: bool = False
    """Allow replacing what is at out (merge: a checkpoint; export: a directory that is not empty)."""


@dataclass
class ExportConfig(MergeConfig):
    """``gpt export``: write a Hugging Face model directory (GPT-2, Llama or Qwen2), or a GGUF file for
    llama.cpp (out=FILE.gguf)."""

    check: bool = False
    """Load the result with transformers (llama.cpp for .gguf) and compare logits."""
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """out=FILE.gguf: the type of the weight matrices (norms and biases stay f32); q8_0 is 8-bit
    blocks of 32 with a scale each, llama.cpp's near-lossless quantization."""


EXPORT = Command("export", schema=ExportConfig, free_text=("ckpt", "out"),
                 usage="gpt export ckpt=RUN_DIR|FILE|hf:DIR out=HF_DIR|FILE.gguf "
                       "[gguf_type=f16|f32|bf16|q8_0] [overwrite=true] [check=true]")
MERGE = Command("merge", schema=MergeConfig, free_text=("ckpt", "out"),
                usage="gpt merge ckpt=LORA_RUN_DIR|FILE out=OUT_DIR [overwrite=true]")


def check_with_transformers(model, out_dir: Path) -> float:
    """Load ``out_dir`` with transformers and return the largest logit difference from ``model`` on
    a fixed sequence (over the exported vocabulary)."""
    from transformers import AutoModelForCausalLM  # optional: the [hf] extra

    ref = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    n_vocab = ref.config.vocab_size
    idx = torch.arange(min(16, model.config.block_size)).unsqueeze(0) * 7 % n_vocab  # (1, T)
    model.eval()
    with torch.no_grad():
        ours = model(idx)[..., :n_vocab]
        theirs = ref(idx).logits
    return (ours - theirs).abs().max().item()


def check_with_llama_cpp(model, gguf_file: Path) -> float:
    """Load ``gguf_file`` with llama.cpp (llama-cpp-python) and return the largest logit difference
    from ``model`` on the same fixed sequence as check_with_transformers."""
    from llama_cpp import Llama  # optional: the [gguf] extra

    # an f32 KV cache (llama.cpp's default is f16): the comparison is of the weights, not the cache
    llm = Llama(model_path=str(gguf_file), n_ctx=model.config.block_size, logits_all=True, verbose=False,
                type_k=0, type_v=0)  # fmt: skip
    n_vocab = llm.n_vocab()
    idx = torch.arange(min(16, model.config.block_size)).unsqueeze(0) * 7 % n_vocab  # (1, T)
    llm.eval(idx[0].tolist())
    theirs = torch.tensor(llm.scores[: idx.size(1)])  # (T, n_vocab)
    model.eval()
    with torch.no_grad():
        ours = model(idx)[0, :, :n_vocab]
    return (ours - theirs).abs().max().item()


def export(ckpt: str, out: str, overwrite: bool = False, check: bool = False, gguf_type: str = "f16"
           ) -> list[Path]:  # fmt: skip
    """Load ``ckpt`` (LoRA adapters merged) and write ``out`` (a directory, or a .gguf file); returns
    the files written."""
    loaded = load(ckpt, merge=True)
    model, tokenizer = loaded.build(), loaded.tokenizer
    if out.endswith(".gguf"):
        target = export_gguf(model, tokenizer, out, gguf_type, overwrite)
        print(f"exported {ckpt} to {target} ({gguf_type}, {target.stat().st_size / 1e6:.1f} MB)")
        if check:
            diff = check_with_llama_cpp(model, target)
            print(f"check: llama.cpp's logits differ from ours by at most {diff:.2e}")
        return [target]
    files, note = export_hf(model, tokenizer, out, overwrite=overwrite)
    print(f"exported {ckpt} to {out}: {', '.join(f.name for f in files)}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    if check:
        diff = check_with_transformers(model, Path(out))
        print(f"check: transformers' logits differ from ours by at most {diff:.2e}")
    return files


def merge_checkpoint(ckpt: str, out: str, overwrite: bool = False) -> Path:
    """Write ``out/ckpt.pt`` (and tokenizer.json): the LoRA checkpoint ``ckpt`` with its adapters
    folded into the base weights, a plain checkpoint that needs no base model."""
    loaded = load(ckpt, merge=True)
    state = loaded.state
    if "lora" not in state:
        raise ConfigError(f"{loaded.source} has no LoRA adapters: there is nothing to merge")
    target = Path(out).expanduser()
    target = target if target.suffix == ".pt" else target / CKPT_NAME
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another out or set overwrite=true")
    # no optimizer: a starting point (init_from), not a run to resume
    merged = checkpoint_state(loaded.weights, loaded.config, state["tokenizer"], optimizer=None,
                              step=state.get("step", 0), tokens=state.get("tokens", 0),
                              config=state.get("config", {}), best_val_loss=state.get("best_val_loss"))
    save_checkpoint(target, merged)
    loaded.tokenizer.save(target.parent)
    return target


def export_job(plain: dict[str, Any]) -> list[Path]:
    cfg = from_dict(ExportConfig, plain)
    return export(cfg.ckpt, cfg.out, cfg.overwrite, cfg.check, cfg.gguf_type)


def merge_job(plain: dict[str, Any]) -> Path:
    cfg = from_dict(MergeConfig, plain)
    target = merge_checkpoint(cfg.ckpt, cfg.out, cfg.overwrite)
    print(f"merged the LoRA adapters of {cfg.ckpt} into {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def export_main(argv: Sequence[str] | None = None) -> list[Path]:
    return main(export_job, EXPORT, argv)


def merge_main(argv: Sequence[str] | None = None) -> Path:
    return main(merge_job, MERGE, argv)
