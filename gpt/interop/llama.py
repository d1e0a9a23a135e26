"""Hugging Face Llama-family models (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) as ours:
their ``config.json`` read into a GPTConfig and their weights mapped to our state dict.

The family is one network: RMSNorm, rotary positions (rotate_half layout, as ours: q/k rows copy
as-is), a SwiGLU MLP and grouped-query attention. What differs is options: Qwen2 has biases on q, k
and v; Llama 3 scales its rotary frequencies; Mistral may use a sliding window (refused: we attend
over the whole context). A config we cannot reproduce exactly is refused with one line naming each
field. ``gpt.interop.hf`` reads the directory and calls this module.

    config = config_from_llama(read_json(d / "config.json"), "d/config.json")
    state_dict = llama_to_gpt(read_hf_weights(d), config, "hf:d")   # fp32, vocabulary not padded

Export is the same mapping in reverse (``BLOCK_PARTS`` drives both): ``llama_problems`` lists what the
family cannot express (learned positions, LayerNorm, a standard MLP), ``llama_config`` writes
config.json (Qwen2ForCausalLM for biases on q, k, v only) and ``gpt_to_llama`` the weights.
"""

from __future__ import annotations

from typing import Any

import torch

from gpt.errors import CheckpointError, ConfigError
from gpt.model import GPTConfig

# architectures[0] (or model_type) -> the family's model_type
LLAMA_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# which config.json fields decide the shape of a weight (named when the file disagrees)
SHAPE_FIELDS_OF = {
    "embed_tokens": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
    "q_proj": "num_attention_heads, hidden_size", "o_proj": "num_attention_heads, hidden_size",
    "k_proj": "num_key_value_heads, num_attention_heads, hidden_size",
    "v_proj": "num_key_value_heads, num_attention_heads, hidden_size",
    "gate_proj": "intermediate_size, hidden_size", "up_proj": "intermediate_size, hidden_size",
    "down_proj": "intermediate_size, hidden_size",
}  # fmt: skip
# each block's tensor of ours <- the Hugging Face tensors stacked along its output rows, in this order
# (import concatenates them, export splits them back); biases exist where the config has them
BLOCK_PARTS = {"ln_1": ("input_layernorm",), "ln_2": ("post_attention_layernorm",),
               "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "attn.c_proj": ("self_attn.o_proj",), "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
               "mlp.c_proj": ("mlp.down_proj",)}  # fmt: skip
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")  # fmt: skip


def _rope_options(hf: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Our rope_* fields from ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``
    (transformers 4, most files on the Hub); the rope type must be the default one or llama3."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "llama3":
        problems.append(f"{key}.rope_type={kind!r} (ours: llama3 or none)")
        return {}
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if not isinstance(params.get(f), (int, float))]
    if missing:
        problems.append(f"{key} of rope_type 'llama3' lacks {missing}")
        return {}
    return {"rope_theta": theta, "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_position": int(params["original_max_position_embeddings"])}  # fmt: skip


def _attention_problems(hf: dict[str, Any], family: str) -> list[str]:
    """What in the attention we cannot reproduce: a sliding window shorter than the context, head_dim
    other than hidden_size / num_attention_heads, key/value heads that do not divide the heads."""
    problems, context = [], hf["max_position_embeddings"]
    window = hf.get("sliding_window")
    windowed = hf.get("use_sliding_window", True) if family == "qwen2" else True
    if windowed and isinstance(window, int) and window < context:
        problems.append(f"sliding_window={window} is shorter than max_position_embeddings={context} "
                        "(ours attends over the whole context)")  # fmt: skip
    layer_types = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if layer_types:
        problems.append(f"layer_types has {sorted(set(layer_types))} (ours: full_attention only)")
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if hf["hidden_size"] % heads:
        problems.append(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads={heads}")
    elif hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        problems.append(f"head_dim={hf['head_dim']} (ours is hidden_size / num_attention_heads = "
                        f"{hf['hidden_size'] // heads})")  # fmt: skip
    if not isinstance(kv, int) or heads % kv:
        problems.append(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    return problems


def _bias_options(hf: dict[str, Any], family: str, problems: list[str]) -> dict[str, bool]:
    """Qwen2: biases on q, k, v only (qkv_bias). Llama/Mistral: attention_bias and mlp_bias both
    false (bias=False) or both true (bias=True: every linear layer but lm_head); one without the other
    has no counterpart here."""
    if family == "qwen2":
        return {"bias": False, "qkv_bias": True}
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention != mlp:
        problems.append(f"attention_bias={str(attention).lower()} with mlp_bias={str(mlp).lower()} "
                        "(ours: both false or both true)")  # fmt: skip
    return {"bias": attention, "qkv_bias": False}


def config_from_llama(hf: dict[str, Any], family: str, source: str = "config.json") -> GPTConfig:
    """Our GPTConfig for a Llama-family ``config.json`` (``family``: llama, mistral or qwen2;
    vocab_size not yet padded); ConfigError naming every field our model cannot reproduce exactly."""
    missing = [k for k in REQUIRED if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if missing:
        raise ConfigError(f"{source} cannot be imported: missing or non-integer keys {missing}")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (ours: silu, the SwiGLU MLP)")
    problems += _attention_problems(hf, family)
    options = _bias_options(hf, family, problems) | _rope_options(hf, problems)
    if problems:
        raise ConfigError(f"{source} describes a model that cannot be imported: " + "; ".join(problems))
    return GPTConfig(
        block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        mlp="swiglu", mlp_hidden=hf["intermediate_size"], norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), pos_emb="rope", dropout=0.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **options,
    )  # fmt: skip


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The Llama-family state dict ``config`` describes: Hugging Face key -> shape."""
    C, hs, H = config.n_embd, config.head_size, config.mlp_hidden
    q, kv = config.n_head * hs, (config.n_kv_head or config.n_head) * hs
    layer = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
             "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C),
             "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, q),
             "mlp.gate_proj.weight": (H, C), "mlp.up_proj.weight": (H, C), "mlp.down_proj.weight": (C, H)}
    if config.bias or config.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                  "self_attn.v_proj.bias": (kv,)}  # fmt: skip
    if config.bias:
        layer |= {"self_attn.o_proj.bias": (C,), "mlp.gate_proj.bias": (H,), "mlp.up_proj.bias": (H,),
                  "mlp.down_proj.bias": (C,)}  # fmt: skip
    out = {"model.embed_tokens.weight": (config.vocab_size, C), "model.norm.weight": (C,)}
    for i in range(config.n_layer):
        out |= {f"model.layers.{i}.{k}": s for k, s in layer.items()}
    if not config.tie_embeddings:
        out["lm_head.weight"] = (config.vocab_size, C)
    return out


def check_shapes(weights: dict[str, torch.Tensor], config: GPTConfig, source: str) -> None:
    """CheckpointError (one line) for a tensor missing from the files, or one whose shape disagrees
    with config.json, naming the tensor and the config fields that decide its shape."""
    expected = hf_shapes(config)
    missing = sorted(set(expected) - set(weights))
    # tied models may store lm_head too; old files keep rotary buffers: neither is a weight we lack
    unexpected = sorted(k for k in set(weights) - set(expected)
                        if k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq"))  # fmt: skip
    if unexpected:
        more = " ..." if len(unexpected) > 4 else ""
        raise CheckpointError(f"{source} has tensors config.json lacks: {unexpected[:4]}{more} (biases "
                              "the config turns off?)")  # fmt: skip
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} tensors config.json describes: {missing[:4]}"
                              f"{' ...' if len(missing) > 4 else ''}")  # fmt: skip
    for key, shape in expected.items():
        have = tuple(weights[key].shape)
        if have != shape:
            fields = next((f for part, f in SHAPE_FIELDS_OF.items() if part in key), "hidden_size")
            raise CheckpointError(f"{source}: {key} is {have} but config.json ({fields}) makes it {shape}; "
                                  "the config and the weights are from different models")  # fmt: skip


def llama_to_gpt(weights: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict (fp32, vocabulary not padded, no lm_head when tied) from Llama-family weights
    checked against ``config``: q, k, v rows stacked into c_attn ((nh + 2 nkv) hs, C), gate and up
    into c_fc (2 H, C), gate first. Rows copy as-is: both rotate halves of each head."""
    check_shapes(weights, config, source)
    w = {k: v.float() for k, v in weights.items()}
    out = {"transformer.wte.weight": w["model.embed_tokens.weight"],
           "transformer.ln_f.weight": w["model.norm.weight"]}  # fmt: skip
    if not config.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    for i in range(config.n_layer):
        for ours, theirs in BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                found = [w[k] for t in theirs if (k := f"model.layers.{i}.{t}.{kind}") in w]
                if found:
                    out[f"transformer.h.{i}.{ours}.{kind}"] = torch.cat(found)
    return {k: v.contiguous() for k, v in out.items()}


# -------------------------------------------------------------------------------------------- export
def llama_problems(config: GPTConfig) -> list[str]:
    """The options of ``config`` that LlamaForCausalLM / Qwen2ForCausalLM cannot express (empty:
    exportable). bias=true exports as Llama's attention_bias and mlp_bias, qkv_bias alone as Qwen2."""
    problems = []
    if config.pos_emb != "rope":
        problems.append(f"model.pos_emb={config.pos_emb!r} (Llama has rotary positions: rope)")
    if config.norm != "rmsnorm":
        problems.append(f"model.norm={config.norm!r} (Llama uses RMSNorm)")
    if config.mlp != "swiglu":
        problems.append(f"model.mlp={config.mlp!r} with model.activation={config.activation!r} "
                        "(Llama's MLP is SwiGLU: mlp=swiglu)")  # fmt: skip
    return problems


def llama_family_of(config: GPTConfig) -> str:
    """'qwen2' for biases on q, k, v only (qkv_bias without bias), else 'llama'."""
    return "qwen2" if config.qkv_bias and not config.bias else "llama"


def llama_config(config: GPTConfig, n_vocab: int, eos_id: int, bos_id: int) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (Qwen2ForCausalLM for qkv_bias): what config_from_llama reads
    back into ``config`` (vocabulary cut to ``n_vocab``), in transformers 4's spelling of the rope
    options, which transformers 5 reads as well."""
    c, family = config, llama_family_of(config)
    out = {
        "architectures": [next(a for a, f in LLAMA_FAMILY.items() if f == family)], "model_type": family,
        "vocab_size": n_vocab, "hidden_size": c.n_embd, "intermediate_size": c.mlp_width,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size, "hidden_act": "silu", "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps or 1e-6, "rope_theta": c.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True, "dtype": "float32",
    }  # fmt: skip
    if family == "llama":
        out |= {"attention_bias": c.bias, "mlp_bias": c.bias}
    else:  # Qwen2: biases on q, k, v are built in; attend over the whole context
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layer}
    if c.rope_scaling_factor != 1.0:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_scaling_factor,
                               "low_freq_factor": c.rope_low_freq_factor,
                               "high_freq_factor": c.rope_high_freq_factor,
                               "original_max_position_embeddings": c.rope_original_max_position}  # fmt: skip
    return out


def gpt_to_llama(state_dict: dict[str, torch.Tensor], config: GPTConfig, n_vocab: int
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
    """llama_to_gpt in reverse (the same BLOCK_PARTS table): our stacked c_attn rows split into q, k, v
    (nh hs, nkv hs, nkv hs), c_fc into gate and up (H, H); vocabulary cut to ``n_vocab`` rows; no
    lm_head when tied (transformers re-ties it). Fresh fp32 tensors."""
    q, kv, H = config.n_head * config.head_size, config.kv_heads * config.head_size, config.mlp_width
    rows = {"attn.c_attn": [q, kv, kv], "mlp.c_fc": [H, H]}
    sd = {k: v.detach().float() for k, v in state_dict.items()}
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"][:n_vocab],
           "model.norm.weight": sd["transformer.ln_f.weight"]}  # fmt: skip
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:n_vocab]
    for i in range(config.n_layer):
        for ours, theirs in BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"transformer.h.{i}.{ours}.{kind}")
                if t is not None:
                    pieces = t.split(rows[ours]) if ours in rows else (t,)
                    out |= {f"model.layers.{i}.{n}.{kind}": p for n, p in zip(theirs, pieces, strict=True)}
    return {k: v.contiguous().clone() for k, v in out.items()}
