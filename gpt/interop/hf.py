"""Hugging Face interop: import a local GPT-2, Llama, Mistral or Qwen2 directory into our model,
export ours back as GPT-2, Llama or Qwen2 (whichever expresses the model exactly).

Import (``python train.py init_from=hf:DIR ...`` does this; no network access anywhere). config.json's
``architectures`` picks the family; the Llama family's config and weight mapping live in
``gpt.interop.llama``; reading the directory (weights single or sharded, tokenizer) is here:

    from gpt.interop.hf import import_hf
    config, state_dict, tokenizer = import_hf("~/models/SmolLM2-135M")  # config.json, the weights
    model = GPT(config)                              # (sharded: model.safetensors.index.json), and
    model.load_state_dict(state_dict)                # tokenizer.json or vocab.json + merges.txt

Export (the command line is ``gpt export ckpt=DIR out=HF_DIR``):

    from gpt.interop.hf import export_hf
    files, note = export_hf(model, tokenizer, "out/hf")  # then AutoModelForCausalLM.from_pretrained("out/hf")

Learned positions + LayerNorm + the standard MLP export as GPT2LMHeadModel; rotary + RMSNorm + SwiGLU
as LlamaForCausalLM (Qwen2ForCausalLM with biases on q, k, v only) through ``gpt.interop.llama``'s
mapping run backwards; tokenizer files come from ``gpt.interop.tokenizer_export``.

Hugging Face's GPT-2 keeps its linear layers as ``Conv1D``, whose weight is (in, out): the transpose
of ``nn.Linear``'s (out, in). The names are otherwise ours, so the mapping is a key copy plus four
transposes per block. Our embedding has ``vocab_size`` padded to a multiple of 64: imported rows past
Hugging Face's are set to the mean embedding (their logits then sit at the average, never on top),
and exported tables are cut back to the tokenizer's size. Weights are read from safetensors (one file,
or the shards an index names), or from ``pytorch_model.bin`` with ``torch.load(weights_only=True)``:
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import check_state_dict
from gpt.errors import CheckpointError, ConfigError
from gpt.interop.hf_vocab import hf_tokenizer, read_json
from gpt.interop.llama import (
    LLAMA_FAMILY,
    config_from_llama,
    gpt_to_llama,
    llama_config,
    llama_problems,
    llama_to_gpt,
)
from gpt.interop.tokenizer_export import tokenizer_files, turn_end_id
from gpt.lora import LoRALinear
from gpt.model import GPT, GPTConfig, pad_vocab
from gpt.tokenizer import Tokenizer

# weights stored as Conv1D (in, out) by Hugging Face, nn.Linear (out, in) by us
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face's activation_function names for ours (model.activation), and back
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}
FROM_HF_ACTIVATION = {v: k for k, v in HF_ACTIVATION.items()} | {"gelu_pytorch_tanh": "gelu_tanh"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our model uses


# -------------------------------------------------------------------------------------------- import
def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 ``config.json`` (vocab_size not yet padded); ConfigError
    naming every option our model cannot reproduce exactly."""
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type={hf['model_type']!r} (only the GPT-2 family, model_type 'gpt2')")
    if hf.get("activation_function", "gelu_new") not in FROM_HF_ACTIVATION:
        ours = ", ".join(FROM_HF_ACTIVATION)
        problems.append(f"activation_function={hf['activation_function']!r} (ours: {ours})")
    if abs(float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS)) - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (ours is {LAYER_NORM_EPS})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append(
            "non-standard attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx)"
        )
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention=true (an encoder-decoder model)")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if not isinstance(hf.get(k), int)]
    if missing:
        problems.append(f"missing or non-integer keys {missing}")
    if problems:
        raise ConfigError(f"{source} describes a model that cannot be imported: " + "; ".join(problems))
    n_embd = hf["n_embd"]
    hidden = hf.get("n_inner") or 4 * n_embd
    config = GPTConfig(
        block_size=int(hf.get("n_positions") or hf.get("n_ctx") or 1024), vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, mlp_ratio=hidden / n_embd,
        dropout=0.0,  # fine-tuning sets model.dropout if it wants any
        bias=True, norm="layernorm", pos_emb="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation=FROM_HF_ACTIVATION[hf.get("activation_function", "gelu_new")],
    )  # fmt: skip
    if int(config.mlp_ratio * n_embd) != hidden:
        raise ConfigError(f"{source}: n_inner={hidden} is not expressible as mlp_ratio * n_embd")
    return config


def _weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names (each must be there)."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map: it is not a sharded checkpoint's index")
    files = [directory / str(name) for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"shard {absent[0]} named in {index} is missing from {directory}"
                              f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; copy every "
                              "shard of the checkpoint there")  # fmt: skip
    return files


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``directory``: model.safetensors (or the shards its index names), else
    pytorch_model.bin read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pickled = directory / "pytorch_model.bin"
    if not any((directory / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        if not pickled.is_file():
            raise CheckpointError(
                f"no model.safetensors or pytorch_model.bin in {directory}: hf:DIR must be a local Hugging "
                "Face model directory (e.g. one written by save_pretrained)"
            )
        try:
            weights = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with disallowed globals, a truncated file, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"{pickled} cannot be read as plain weights ({first}); convert it to "
                                  "model.safetensors") from None  # fmt: skip
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{pickled} is not a state dict of tensors")
        return weights
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        try:
            weights.update(load_file(file, device="cpu"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    return weights


def hf_to_gpt(weights: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face GPT-2 weights to our state dict: strip/add the ``transformer.`` prefix,
    transpose Conv1D weights, drop the old causal-mask buffers and a tied lm_head. Converted to fp32
    (training keeps fp32 weights); the vocabulary is not yet padded."""
    out: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        name = key.removeprefix("transformer.")
        if name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue  # causal-mask buffers of older transformers versions, not weights
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = t
            continue  # tied: the same tensor as wte
        out["transformer." + name] = t.t() if name.endswith(CONV1D) else t
    return {k: v.float().contiguous() for k, v in out.items()}


def pad_vocab_rows(state_dict: dict[str, torch.Tensor], config: GPTConfig, hf_vocab: int
                   ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Embedding (and untied head) rows from ``hf_vocab`` up to ``config.vocab_size`` set to the mean
    row, whose logit is the average, never the top; a tied head is listed as wte itself."""
    out = dict(state_dict)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        table = out.get(key)
        if table is not None and table.size(0) == hf_vocab < config.vocab_size:
            extra = table.mean(dim=0, keepdim=True).expand(config.vocab_size - hf_vocab, -1)
            out[key] = torch.cat([table, extra])  # (vocab_size, n_embd)
    if config.tie_embeddings and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # our state dict lists the tied head too
    return out


def hf_family(hf: dict[str, Any], source: str) -> str:
    """'gpt2', 'llama', 'mistral' or 'qwen2': the family of a config.json, from its architectures
    (else its model_type); ConfigError naming the field for any other."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch in ("GPT2LMHeadModel", "GPT2Model"):
        return "gpt2"
    if arch in LLAMA_FAMILY:
        return LLAMA_FAMILY[arch]
    kind = hf.get("model_type", "gpt2")
    if arch is None and kind in ("gpt2", *LLAMA_FAMILY.values()):
        return kind
    what = f"architectures={archs}" if arch is not None else f"model_type={kind!r}"
    raise ConfigError(f"{source}: {what} cannot be imported (ours: GPT2LMHeadModel, "
                      f"{', '.join(LLAMA_FAMILY)})")  # fmt: skip


def import_hf(directory: str | Path, with_tokenizer: bool = True
              ) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer | None]:  # fmt: skip
    """(model config, state dict, tokenizer) from a local Hugging Face directory of a GPT-2,
    Llama, Mistral or Qwen2 model: config.json, model.safetensors (sharded with its index, or
    pytorch_model.bin) and the tokenizer's files (skipped, and None returned, without
    ``with_tokenizer``). The state dict is checked against the config: missing/unexpected keys and
    wrong shapes are listed in a CheckpointError."""
    d = Path(directory).expanduser()
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}/config.json not found: hf:DIR must be a local Hugging Face model "
                              "directory")  # fmt: skip
    source = str(d / "config.json")
    hf = read_json(d / "config.json")
    family = hf_family(hf, source)
    config = config_from_hf(hf, source) if family == "gpt2" else config_from_llama(hf, family, source)
    tokenizer = hf_tokenizer(d) if with_tokenizer else None
    hf_vocab = config.vocab_size
    weights = read_hf_weights(d)
    gpt2 = family == "gpt2"
    state_dict = hf_to_gpt(weights, config) if gpt2 else llama_to_gpt(weights, config, f"hf:{d}")
    config.vocab_size = pad_vocab(max(hf_vocab, tokenizer.vocab_size if tokenizer else 0))
    state_dict = pad_vocab_rows(state_dict, config, hf_vocab)
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = GPT(config).state_dict()
    check_state_dict(expected, state_dict, f"hf:{d}")
    return config, state_dict, tokenizer


# -------------------------------------------------------------------------------------------- export
def gpt2_problems(config: GPTConfig) -> list[str]:
    """The options of ``config`` that GPT2LMHeadModel cannot express (empty: exportable).
    bias=false exports as zero biases and untied embeddings as tie_word_embeddings=false."""
    problems = []
    if config.pos_emb != "learned":
        problems.append(f"model.pos_emb={config.pos_emb!r} (GPT-2 has learned absolute positions, no rotary)")
    if config.norm != "layernorm":
        problems.append(f"model.norm={config.norm!r} (GPT-2 uses LayerNorm)")
    if config.norm == "layernorm" and (config.norm_eps or LAYER_NORM_EPS) != LAYER_NORM_EPS:
        problems.append(f"model.norm_eps={config.norm_eps} (GPT-2's is {LAYER_NORM_EPS})")
    if config.mlp != "standard":
        problems.append(f"model.mlp={config.mlp!r} (GPT-2's MLP is c_fc -> activation -> c_proj)")
    if config.kv_heads != config.n_head:
        problems.append(f"model.n_kv_head={config.n_kv_head} (GPT-2 has as many key/value heads as heads)")
    if config.qkv_bias and not config.bias:
        problems.append("model.qkv_bias=true with model.bias=false (GPT-2 has every bias or none)")
    return problems


def export_problems(config: GPTConfig) -> tuple[str, list[str]]:
    """('gpt2' or 'llama', []) for the family that expresses ``config`` exactly, else ('', what
    each family lacks, one entry per option)."""
    gpt2, llama = gpt2_problems(config), llama_problems(config)
    if not gpt2:
        return "gpt2", []
    if not llama:
        return "llama", []
    return "", [f"as GPT2LMHeadModel: {'; '.join(gpt2)}", f"as LlamaForCausalLM: {'; '.join(llama)}"]


def gpt_to_hf(state_dict: dict[str, torch.Tensor], config: GPTConfig, n_vocab: int
              ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Our state dict as GPT2LMHeadModel's: Conv1D transposes, vocabulary cut to ``n_vocab`` rows,
    zero biases where our model has none, and no lm_head.weight when tied (safetensors stores a
    tensor once; transformers re-ties it)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        if key in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:n_vocab]
        out[key] = (t.t() if key.endswith(CONV1D) else t).detach().float().contiguous().clone()
    if not config.bias:  # GPT-2 always has biases; zeros compute exactly what ours computes
        C, hidden = config.n_embd, int(config.mlp_ratio * config.n_embd)
        sizes = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C}
        sizes |= {"mlp.c_fc": hidden, "mlp.c_proj": C}
        for i in range(config.n_layer):
            for name, n in sizes.items():
                out[f"transformer.h.{i}.{name}.bias"] = torch.zeros(n)
        out["transformer.ln_f.bias"] = torch.zeros(C)
    return out


def hf_config(config: GPTConfig, n_vocab: int, eot_id: int) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel."""
    c = config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": n_vocab,
        "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_inner": int(c.mlp_ratio * c.n_embd), "activation_function": HF_ACTIVATION[c.activation],
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "use_cache": True, "dtype": "float32",
    }  # fmt: skip


def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path, overwrite: bool = False
              ) -> tuple[list[Path], str | None]:  # fmt: skip
    """Write ``out_dir`` for transformers' ``from_pretrained``: config.json and model.safetensors of a
    GPT2LMHeadModel (learned positions, LayerNorm) or a LlamaForCausalLM (rotary, RMSNorm, SwiGLU;
    Qwen2ForCausalLM for biases on q, k, v only), plus the tokenizer's files where Hugging Face can
    express it. A model neither family expresses raises ConfigError listing every option, before
    anything is written; so does an ``out_dir`` that is not empty, unless ``overwrite``. Returns (the
    files written, None or the one-line note on why the tokenizer stays ours)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model still has LoRA adapters: merge them first (gpt merge ckpt=... out=...)")
    family, problems = export_problems(model.config)
    if problems:
        raise ConfigError(f"this model cannot be exported to Hugging Face: {' | '.join(problems)}")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ConfigError(
            f"out={out} exists and is not an empty directory; choose another or set overwrite=true"
        )
    n_vocab, eos = tokenizer.vocab_size, tokenizer.eot_id
    if family == "gpt2":
        weights = gpt_to_hf(model.state_dict(), model.config, n_vocab)
        config = hf_config(model.config, n_vocab, eos)
    else:
        weights = gpt_to_llama(model.state_dict(), model.config, n_vocab)
        bos = getattr(tokenizer, "bos_id", None)  # a tokenizer.json's BOS; ours have none: eos
        config = llama_config(model.config, n_vocab, eos, eos if bos is None else bos)
    files, note = tokenizer_files(tokenizer)
    files["config.json"] = json.dumps(config, indent=2)
    files["generation_config.json"] = json.dumps(generation_config(tokenizer), indent=2)
    return _write_dir(out, weights, files), note


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """transformers' generate() stops where our decoding does: at the end of the text, and at the end
    of a chat turn where the tokenizer has a token for it (a chat model's reply ends there)."""
    stops = list(dict.fromkeys([tokenizer.eot_id, turn_end_id(tokenizer)]))
    return {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tokenizer.eot_id}


def _write_dir(out: Path, weights: dict[str, torch.Tensor], files: dict[str, str]) -> list[Path]:
    """model.safetensors and ``files`` built beside ``out``, then moved in: a failure leaves no
    half-written model."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
