"""Export to GGUF, llama.cpp's file format (and ollama's, LM Studio's, ...), through the ``gguf``
package: llama.cpp's own writer library.

    gpt export ckpt=out/chat out=out/chat.gguf                    # f16 weights, llama.cpp's default
    gpt export ckpt=out/chat out=out/chat-q8.gguf gguf_type=q8_0  # 8-bit blocks of 32 (or f32, bf16)
    llama-cli -m out/chat.gguf ...  # or llama_cpp.Llama(model_path="out/chat.gguf").create_chat_completion

The model goes as llama.cpp's ``llama`` architecture when Hugging Face would take it as a Llama
(rotary, RMSNorm, SwiGLU; biases on q, k, v, GQA and Llama 3's rope scaling included), as ``gpt2``
when it is GPT-2-shaped (``gpt.interop.hf.export_problems`` decides; the same options are refused).
The weights are those of the Hugging Face export (``gpt_to_llama`` / ``gpt_to_hf``) renamed to
llama.cpp's tensor names, with one change: llama.cpp's ``llama`` rotates adjacent pairs (x0, x1) where
ours and Hugging Face's rotate halves (x_i, x_{i + hs/2}), so the rows of q and k are reordered per
head, as llama.cpp's own converter does. Norms and biases stay f32; a matrix whose rows are not a
multiple of 32 long stays f16 under q8_0.

The tokenizer goes in the file: a byte-level BPE (ours trained with data.tokenizer=bpe, GPT-2's, or a
Hugging Face tokenizer.json) as llama.cpp's ``gpt2`` tokenizer with its tokens, merges and the name
of its split pattern (``tokenizer.ggml.pre``: llama.cpp implements each pattern in C++, so only the
patterns it knows can go); the special tokens (the tool tokens included) as control tokens that user
text never produces; the end of turn as the end-of-generation token; the chat template that
``gpt export`` writes for transformers (tool calls included). A char tokenizer has no GGUF counterpart
and is refused, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.errors import ConfigError
from gpt.hf_tokenizer import HFTokenizer
from gpt.interop.hf import CONV1D, LAYER_NORM_EPS, export_problems, gpt_to_hf
from gpt.interop.llama import gpt_to_llama
from gpt.interop.tokenizer_export import byte_level_vocab, chat_template, turn_end_id
from gpt.lora import LoRALinear
from gpt.model import GPT, GPTConfig
from gpt.ops import rope_frequencies
from gpt.tokenizer import GPT2_PATTERN, Tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's name (tokenizer.ggml.pre) for each split pattern it implements, spelled as our
# tokenizers (rustbpe's GPT-4 pattern, GPT-2's) and Hugging Face's tokenizer.json files store it
GGUF_PRE = {
    GPT2_PATTERN: "gpt-2",
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # rustbpe's GPT-4 pattern (data.tokenizer=bpe)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",  # Llama 3's tokenizer.json
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",  # Qwen2's
}  # fmt: skip
# Hugging Face tensor name (after "model.layers.N.") -> llama.cpp's (after "blk.N.")
LLAMA_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip
# ours / GPT-2's (after "transformer.h.N.") -> llama.cpp's gpt2 (after "blk.N.")
GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
LLAMA_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip


# ----------------------------------------------------------------------------------------- tensors
def pairs_from_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (heads * hs, ...) reordered within each head from the rotate-halves layout
    (0, 1, ..., hs/2 - 1 | hs/2, ...) to llama.cpp's adjacent pairs (0, hs/2, 1, hs/2 + 1, ...), so
    that its rotation of pair (2i, 2i + 1) is ours of (i, i + hs/2)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(model: GPT, n_vocab: int) -> dict[str, torch.Tensor]:
    """llama.cpp's llama tensors (fp32) for a Llama-shaped ``model``: Hugging Face's Llama weights
    renamed, q and k rows in adjacent pairs, and rope_freqs (the divisor of each frequency) under
    Llama 3's rope scaling."""
    c = model.config
    out: dict[str, torch.Tensor] = {}
    for key, t in gpt_to_llama(model.state_dict(), c, n_vocab).items():
        if key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            part, kind = rest.rsplit(".", 1)
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                t = pairs_from_halves(t, c.n_head if part.endswith("q_proj") else c.kv_heads)
            out[f"blk.{i}.{LLAMA_NAMES[part]}.{kind}"] = t
        else:
            out[LLAMA_TOP[key]] = t
    if c.rope_scaling_factor != 1.0:  # llama.cpp divides each frequency by its factor
        plain = rope_frequencies(c.head_size, c.rope_theta)
        out["rope_freqs.weight"] = plain / rope_frequencies(
            c.head_size, c.rope_theta, c.rope_scaling_factor, c.rope_low_freq_factor,
            c.rope_high_freq_factor, c.rope_original_max_position)  # fmt: skip
    return out


def gpt2_tensors(model: GPT, n_vocab: int) -> dict[str, torch.Tensor]:
    """llama.cpp's gpt2 tensors (fp32): GPT-2's export (zero biases where ours has none) renamed,
    weights (out, in) as nn.Linear keeps them."""
    out: dict[str, torch.Tensor] = {}
    top = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
    for key, t in gpt_to_hf(model.state_dict(), model.config, n_vocab).items():
        t = t.t().contiguous() if key.endswith(CONV1D) else t
        parts = key.removeprefix("transformer.").split(".")
        if parts[0] == "h":
            out[f"blk.{parts[1]}.{GPT2_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"] = t
        elif parts[0] == "lm_head":
            out["output.weight"] = t
        else:
            out[f"{top[parts[0]]}.{parts[-1]}"] = t
    return out


def _encoded(t: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(the array to write, its GGML type or None for a plain float array): 1-D tensors in f32."""
    from gguf import GGMLQuantizationType, quants

    data = t.detach().float().cpu().numpy()
    if data.ndim == 1 or gguf_type == "f32":
        return data, None
    if gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    if gguf_type == "bf16":
        return quants.quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    return data.astype(np.float16), None  # f16, and q8_0's rows that are not blocks of 32


# --------------------------------------------------------------------------------------- tokenizer
def _hf_pre(definition: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json's pre_tokenizer, None if it has none."""
    pre = definition.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split is not None and kinds in (["Split", "ByteLevel"], ["Split"]):
        return GGUF_PRE.get((split.get("pattern") or {}).get("Regex"))
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    digits = kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
    if digits and steps[1].get("use_regex", True):
        return "smollm"
    return None


def gguf_vocab(tokenizer: Tokenizer) -> dict[str, Any]:
    """{pre, tokens, types, merges}: the tokenizer as llama.cpp's byte-level BPE ("gpt2"); ConfigError
    (one line) for one it cannot express."""
    from gguf import TokenType

    state = tokenizer.to_state()
    if state["kind"] == HFTokenizer.kind:
        definition, model = state["definition"], state["definition"].get("model") or {}
        byte_level = "ByteLevel" in str(definition.get("pre_tokenizer")) and model.get("type") == "BPE"
        if not byte_level or model.get("byte_fallback"):
            raise ConfigError("this tokenizer.json is not a byte-level BPE (llama.cpp's gpt2 tokenizer): "
                              "a SentencePiece-style tokenizer cannot be written to GGUF by gpt export")
        vocab = dict(model["vocab"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        added = {a["content"]: (a["id"], a.get("special", False)) for a in definition.get("added_tokens", [])}
        pre = _hf_pre(definition)
        if pre is not None and bool(model.get("ignore_merges")) != (pre == "llama-bpe"):
            pre = None  # llama.cpp ties ignore_merges to the pattern: another pairing tokenizes otherwise
    elif "mergeable_ranks" in state:
        vocab, merges = byte_level_vocab(state)
        added = {name: (i, True) for name, i in state["special_tokens"].items()}
        pre = GGUF_PRE.get(state["pattern"])
    else:
        raise ConfigError(f"a {state['kind']} tokenizer has no GGUF counterpart (llama.cpp reads byte-level "
                          "BPE): train with data.tokenizer=bpe or gpt2 to export to GGUF")
    if pre is None:
        known = ", ".join(sorted({*GGUF_PRE.values(), "smollm"}))
        raise ConfigError("llama.cpp implements no pre-tokenizer for this tokenizer's split pattern, so a "
                          f"GGUF file would tokenize text differently (known: {known})")
    n = tokenizer.vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(n)], [TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for text, (i, special) in added.items():
        tokens[i], types[i] = text, TokenType.CONTROL if special else TokenType.USER_DEFINED
    return {"pre": pre, "tokens": tokens, "types": types, "merges": [f"{a} {b}" for a, b in merges]}


# ------------------------------------------------------------------------------------------ writer
def _metadata(writer, config: GPTConfig, family: str, n_vocab: int) -> None:
    c = config
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.mlp_width)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_vocab_size(n_vocab)
    if family == "gpt2":
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
    else:
        writer.add_layer_norm_rms_eps(c.norm_eps or 1e-6)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.head_size)


def _tokenizer_metadata(writer, tokenizer: Tokenizer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    bos = getattr(tokenizer, "bos_id", None)
    writer.add_bos_token_id(tokenizer.eot_id if bos is None else bos)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_eot_token_id(turn_end_id(tokenizer))  # llama.cpp stops at it: the end of a reply
    pad = getattr(tokenizer, "pad_id", None)
    writer.add_pad_token_id(tokenizer.eot_id if pad is None else pad)
    writer.add_add_bos_token(False)  # our prompts carry what they need; a chat template writes its own
    template = chat_template(tokenizer)
    if template is not None:
        writer.add_chat_template(template)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.suffix != ".gguf":
        raise ConfigError(f"out={target} must end in .gguf to write GGUF")
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ConfigError(f"out={target} exists and is not a regular file; choose another path")
    if target.exists() and not overwrite:
        raise ConfigError(f"out={target} already exists; choose another or set overwrite=true")


def export_gguf(model: GPT, tokenizer: Tokenizer, out_file: str | Path, gguf_type: str = "f16",
                overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``out_file`` (.gguf) for llama.cpp: the weights in ``gguf_type`` (f32, f16, bf16, q8_0),
    the tokenizer and the chat template. ConfigError, before anything is written, for a model or a
    tokenizer llama.cpp cannot run as ours, or a target that exists (unless ``overwrite``) or is not a
    regular file; the file appears whole or not at all."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"gguf_type={gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model still has LoRA adapters: merge them first (gpt merge ckpt=... out=...)")
    family, problems = export_problems(model.config)
    if family == "gpt2" and model.config.activation != "gelu_tanh":
        family = ""
        problems = [f"model.activation={model.config.activation!r} (llama.cpp's gpt2 uses gelu_tanh)"]
    if problems:
        raise ConfigError(f"this model cannot be exported to GGUF: {' | '.join(problems)}")
    target = Path(out_file).expanduser()
    _check_target(target, overwrite)
    vocab, n_vocab = gguf_vocab(tokenizer), tokenizer.vocab_size
    tensors = (gpt2_tensors if family == "gpt2" else llama_tensors)(model, n_vocab)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "gpt2" if family == "gpt2" else "llama")
    try:
        writer.add_name(target.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _metadata(writer, model.config, family, n_vocab)
        _tokenizer_metadata(writer, tokenizer, vocab)
        for name, t in tensors.items():
            data, raw = _encoded(t, gguf_type)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
