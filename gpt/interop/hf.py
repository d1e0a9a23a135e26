"""Hugging Face interop: import a local GPT-2, Llama, Mistral or Qwen2 directory into our model,
export ours back as GPT-2.

Import (``python train.py init_from=hf:DIR ...`` does this; no network access anywhere). config.json's
``architectures`` picks the family; the Llama family's config and weight mapping live in
``gpt.interop.llama``; reading the directory (weights single or sharded, tokenizer) is here:

    from gpt.interop.hf import import_hf
    config, state_dict, tokenizer = import_hf("~/models/SmolLM2-135M")  # config.json, the weights
    model = GPT(config)                              # (sharded: model.safetensors.index.json), and
    model.load_state_dict(state_dict)                # tokenizer.json or vocab.json + merges.txt

Export (the command line is ``gpt export ckpt=DIR out=HF_DIR``):

    from gpt.interop.hf import export_hf
    export_hf(model, tokenizer, "out/hf")  # then transformers.GPT2LMHeadModel.from_pretrained("out/hf")

Hugging Face's GPT-2 keeps its linear layers as ``Conv1D``, whose weight is (in, out): the transpose
of ``nn.Linear``'s (out, in). The names are otherwise ours, so the mapping is a key copy plus four
transposes per block. Our embedding has ``vocab_size`` padded to a multiple of 64: imported rows past
Hugging Face's are set to the mean embedding (their logits then sit at the average, never on top),
and exported tables are cut back to the tokenizer's size. Weights are read from safetensors (one file,
or the shards an index names), or from ``pytorch_model.bin`` with ``torch.load(weights_only=True)``:
nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import check_state_dict
from gpt.errors import CheckpointError, ConfigError, DataError
from gpt.hf_tokenizer import bytes_to_unicode
from gpt.interop.hf_vocab import hf_tokenizer, read_json
from gpt.interop.llama import LLAMA_FAMILY, config_from_llama, llama_to_gpt
from gpt.lora import LoRALinear
from gpt.model import GPT, GPTConfig, pad_vocab
from gpt.tokenizer import EOT, GPT2_PATTERN, Tokenizer

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
def export_problems(config: GPTConfig) -> list[str]:
    """The options of ``config`` that GPT2LMHeadModel cannot express (empty: exportable).
    bias=false exports as zero biases and untied embeddings as tie_word_embeddings=false."""
    problems = []
    if config.pos_emb != "learned":
        problems.append(f"model.pos_emb={config.pos_emb!r} (GPT-2 has learned absolute positions, no rotary)")
    if config.norm != "layernorm":
        problems.append(f"model.norm={config.norm!r} (GPT-2 uses LayerNorm)")
    return problems


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


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The merge that creates ``token``: byte-level BPE on it with only the merges ranked below its
    own leaves exactly two parts."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise DataError(f"token {token!r} is not the result of a merge of lower-ranked tokens")
    return parts[0], parts[1]


def hf_tokenizer_files(tokenizer) -> dict[str, str] | None:
    """{file name: text} of vocab.json, merges.txt and tokenizer_config.json for a GPT-2-style
    byte-level BPE tokenizer ("gpt2", or "hf" with GPT-2's split pattern); None for any other."""
    state = tokenizer.to_state()
    if state["kind"] not in ("gpt2", "hf") or state["pattern"] != GPT2_PATTERN:
        return None
    ranks = {base64.b64decode(k): int(r) for k, r in state["mergeable_ranks"].items()}
    id_map = state.get("id_map")
    b2u = bytes_to_unicode()
    spell = lambda b: "".join(b2u[x] for x in b)
    vocab = {spell(t): (id_map[r] if id_map else r) for t, r in ranks.items()}
    vocab.update(state["special_tokens"])
    merges = ["#version: 0.2"]
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            merges.append(" ".join(spell(p) for p in _merge_parts(ranks, token)))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    return {
        "vocab.json": json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False),
        "merges.txt": "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=1),
    }


def export_hf(model: GPT, tokenizer, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``out_dir`` for ``transformers.GPT2LMHeadModel.from_pretrained``: config.json and
    model.safetensors, plus the tokenizer files when the tokenizer is GPT-2-style. A model with
    options GPT-2 lacks raises ConfigError listing them, before anything is written. An ``out_dir``
    that is not empty is refused unless ``overwrite``. Returns the files written."""
    from safetensors.torch import save_file

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model still has LoRA adapters: merge them first (gpt merge ckpt=... out=...)")
    problems = export_problems(model.config)
    if problems:
        raise ConfigError(f"this model cannot be exported to Hugging Face GPT-2 format: {'; '.join(problems)}"
                          ". Only models with learned positions and LayerNorm (the GPT-2 family) can be")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ConfigError(
            f"out={out} exists and is not an empty directory; choose another or set overwrite=true"
        )
    n_vocab = tokenizer.vocab_size
    weights = gpt_to_hf(model.state_dict(), model.config, n_vocab)
    files = hf_tokenizer_files(tokenizer) or {}
    files["config.json"] = json.dumps(hf_config(model.config, n_vocab, tokenizer.eot_id), indent=2)
    # build everything beside the target, then move it in: a failure leaves no half-written model
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
