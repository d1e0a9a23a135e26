"""The GPT model: a causal decoder-only stack of pre-norm residual blocks.

Reads top-down: norms, rotary embedding, attention, MLP, block, config, model. Parameter names follow
GPT-2 (``wte``, ``wpe``, ``h.{i}.attn.c_attn``, ``ln_f``, ...) so Hugging Face weights import as a key
copy. One ``forward(idx, targets=None, kv_cache=None)`` serves pretraining, fine-tuning (targets of -1
are ignored), and inference with a KV cache (see ``gpt.infer.engine``); ``doc_ids`` packs several
documents into one row, each attending only to itself with positions restarting at 0.

    from gpt.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=128))
    logits = model(idx)              # (B, T, vocab_size)
    loss = model(idx, targets)       # scalar, mean over targets != -1
    loss = model(idx, targets, doc_ids=doc)  # packed rows: doc (B, T) numbers each token's document
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import ops
from gpt.errors import ConfigError
from gpt.ops import linear, one_token_attention, relu_squared, rms_norm, rope_frequencies, rope_tables, rotate

# fields that define the weights' shapes and meaning: a loaded checkpoint must agree on them
SHAPE_FIELDS = (
    "n_layer", "n_head", "n_embd", "mlp_ratio", "bias", "norm", "pos_emb", "tie_embeddings", "activation",
    "mlp", "mlp_hidden", "n_kv_head", "qkv_bias", "norm_eps", "rope_theta", "rope_scaling_factor",
    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position",
)  # fmt: skip
# model.activation -> the MLP's nonlinearity
ACTIVATIONS = {
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),  # as GPT-2 was trained
    "gelu": F.gelu,  # exact (erf)
    "relu2": relu_squared,  # ReLU squared
}


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up: matmuls with a multiple-of-64 dimension are markedly faster."""
    return (n + multiple - 1) // multiple * multiple


@dataclass
class GPTConfig:
    """Shape and options of the network. ``vocab_size`` is set from the tokenizer (padded to 64)."""

    block_size: int = 256
    """Longest sequence the model attends over (the context length)."""
    vocab_size: int = 50304
    """Rows of the embedding table; the tokenizer's size rounded up to a multiple of 64."""
    n_layer: int = 12
    n_head: int = 12
    """Query heads; head size = n_embd / n_head."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention; 1 = multi-query): each serves n_head / n_kv_head
    consecutive query heads, and the KV cache holds only these. None = n_head (multi-head)."""
    n_embd: int = 768
    mlp: str = "standard"
    """'standard' (c_fc -> activation -> c_proj, GPT-2's) or 'swiglu' (Llama's gated MLP:
    c_proj(silu(gate) * up), gate and up the two halves of one c_fc; ``activation`` is not used)."""
    mlp_ratio: float = 4.0
    """Hidden width of the standard MLP as a multiple of n_embd (when mlp_hidden is None)."""
    mlp_hidden: int | None = None
    """Hidden width of the MLP (Hugging Face's intermediate_size). None = the rule: mlp_ratio * n_embd
    for 'standard'; Llama's 2/3 * 4 * n_embd rounded up to a multiple of 256 for 'swiglu'."""
    dropout: float = 0.0
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2 has them; modern models drop them)."""
    qkv_bias: bool = False
    """A bias on the q, k, v projection (c_attn) even when ``bias`` is off (Qwen2)."""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm' (a gain only, no bias)."""
    norm_eps: float | None = None
    """Epsilon of every norm; None = 1e-5 for LayerNorm, 1e-6 for RMSNorm."""
    pos_emb: str = "learned"
    """'learned' (GPT-2's absolute table) or 'rope' (rotary, applied to queries and keys)."""
    rope_theta: float = 10000.0
    """RoPE's base: the rotation of pair i is position * rope_theta^(-2i / head_size)."""
    rope_scaling_factor: float = 1.0
    """Llama 3's rope scaling (1 = none): low frequencies are divided by this factor, high ones kept,
    those between interpolated (transformers' rope_type 'llama3')."""
    rope_low_freq_factor: float = 1.0
    """Llama 3 scaling: wavelengths above rope_original_max_position / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama 3 scaling: wavelengths below rope_original_max_position / this are kept."""
    rope_original_max_position: int = 8192
    """Llama 3 scaling: the context length the model was first trained at."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (GPT-2 does)."""
    activation: str = "gelu_tanh"
    """The MLP's nonlinearity: 'gelu_tanh' (GPT-2's tanh approximation), 'gelu' (exact, erf) or
    'relu2' (ReLU squared). On CPUs the erf GELU is 2-3x faster than the tanh one (docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} "
                              "(None = n_head)")  # fmt: skip
        if self.n_embd % self.n_head != 0:
            valid = [h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                              f"choose n_head from {valid} or change n_embd")  # fmt: skip
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.norm={self.norm!r} must be 'layernorm' or 'rmsnorm'")
        if self.pos_emb not in ("learned", "rope"):
            raise ConfigError(f"model.pos_emb={self.pos_emb!r} must be 'learned' or 'rope'")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("model.pos_emb='rope' needs an even head size (n_embd / n_head)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={self.activation!r} must be one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.mlp not in ("standard", "swiglu"):
            raise ConfigError(f"model.mlp={self.mlp!r} must be 'standard' or 'swiglu'")
        for name in ("mlp_hidden", "norm_eps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive (None = the default)")
        if self.rope_scaling_factor != 1.0 and not (
            self.rope_scaling_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ConfigError("model.rope_scaling_factor must be positive and 0 < model.rope_low_freq_factor "
                              "< model.rope_high_freq_factor")  # fmt: skip

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is None."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: mlp_hidden, or the rule of the MLP kind (see mlp_hidden)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return (int(2 * 4 * self.n_embd / 3) + 255) // 256 * 256
        return int(self.mlp_ratio * self.n_embd)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def document_positions_and_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows doc_ids (B, T): each token's position within its document (B, T), and the
    attention mask (B, 1, T, T), True where query i may see key j: same document and j <= i."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # each document's start
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return idx - first, (same & causal)[:, None]


class KVStore(Protocol):
    """What the model reads from a KV cache during one forward (``gpt.infer.engine.KVCache``, set up
    by its ``begin``): rows may hold different numbers of cached positions."""

    positions: torch.Tensor
    """(B, T) the new tokens' positions: each row's cached length, + 0, 1, ..."""
    attn_mask: torch.Tensor | None
    """(B or 1, 1, T, S) True where a query may see a key, S the keys ``update`` returns; None when a
    plain causal mask (an empty cache) or no mask (one new token after equally long rows) is right."""
    start: int | None  # the rows' common cached length; None when they differ

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, hs) at the rows' positions; return all keys, values (B, nkv, S, hs)"""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps or 1e-6)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps or 1e-5, bias=config.bias)


def cpu_attention_upcast(qkv: torch.Tensor, head_size: int) -> bool:
    """Whether attention on this CPU should run in fp32 although its inputs are bf16 (autocast).

    Measured on a 2-core AVX512-BF16/AMX CPU (torch 2.13, fwd + bwd of causal SDPA): with head size
    32 the bf16 flash backward is 3-5x slower than fp32 (3.8 vs 0.8 ms at B=12, nh=4, T=64), with
    head size 64 it is even or faster. Only backward is slow, so inference keeps bf16.
    """
    return qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16 and head_size < 64 and qkv.requires_grad


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # one matmul for q (n_head heads), k and v (n_kv_head heads each), side by side: GPT-2's
        # layout when the counts are equal, so imported weights need no reshuffling
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVStore | None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, C // self.n_head
        qkv = linear(self.c_attn, x)  # (B, T, (nh + 2 nkv) hs): queries, keys, values side by side
        dtype, upcast = qkv.dtype, cpu_attention_upcast(qkv, hs)
        if upcast:
            qkv = qkv.float()  # one copy for q, k and v (and the rotation in fp32)
        qk, v = qkv.split(((nh + nkv) * hs, nkv * hs), dim=2)
        qk = qk.view(B, T, nh + nkv, hs)  # the queries' heads, then the keys'
        if rope is not None:
            qk = rotate(qk, *rope)  # one rotation for q and k; tables (T or B x T, 1, hs/2)
        q, k = qk.transpose(1, 2).split((nh, nkv), dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nkv, S, hs): the cached keys and the new ones
        dropout_p = self.dropout if self.training else 0.0
        # attn_mask: packed documents' (B, 1, T, T), or the cache's (ragged rows, tokens after cached
        # ones); else causal over the T new tokens (training, a prefill), or one token sees every key.
        causal = attn_mask is None and T > 1
        # upcast: autocast would cast the inputs back to bf16. GQA: SDPA shares each k/v head itself
        # (as fast as repeat_interleave in training, faster in decoding: B=8, nh=8, nkv=2, T=128)
        cpu_decode = not (dropout_p or upcast) and q.device.type == "cpu" and kv_cache is not None
        if T == 1 and cpu_decode:  # a decode step on the CPU
            y = one_token_attention(q, k, v, attn_mask)
        elif cpu_decode and kv_cache.start and T <= ops.FEW_TOKENS:  # drafts checked: each as its own step
            y = ops.few_token_attention(q, k, v)
        else:
            with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=nkv != nh
                )
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(linear(self.c_proj, y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_width
        self.gated = config.mlp == "swiglu"
        # swiglu: gate and up in one matmul, (2 hidden, C), the gate's rows first (as fast as two
        # matmuls on the CPU, fwd + bwd at (8, 128, 128) -> 512, and one module for LoRA and Muon)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
        self.dropout = nn.Dropout(config.dropout)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(self.c_fc, x)  # (B, T, hidden), or (B, T, 2 hidden): gate, up
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.dropout(linear(self.c_proj, F.silu(gate) * up))
        return self.dropout(linear(self.c_proj, self.act(h)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rope=None, kv_cache: KVStore | None = None, attn_mask=None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]), ln_f=make_norm(config),
        ))  # fmt: skip
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos_emb == "rope":
            inv_freq = rope_frequencies(
                config.head_size, config.rope_theta, config.rope_scaling_factor, config.rope_low_freq_factor,
                config.rope_high_freq_factor, config.rope_original_max_position,
            )  # fmt: skip
            cos, sin = rope_tables(inv_freq, config.block_size)
            # not persistent: derived from the config, so checkpoints stay plain weights
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), with residual projections scaled by 1/sqrt(2 * n_layer)
        so the residual stream's variance does not grow with depth."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_proj", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position table (and the tied token table
        counts once, as the output head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls with the weights
        plus 12 * n_layer * n_embd * T for attention scores and values (PaLM appendix B)."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVStore | None = None,
                doc_ids: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:  # fmt: skip
        """idx (B, T) token ids. With targets (B, T): the mean cross-entropy over targets != -1.
        Without: logits (B, T, vocab_size), or (B, 1, vocab_size) for the last position alone with
        ``last_only`` (a prefill needs no more: the head is the largest matmul for a big vocabulary).
        With kv_cache (prepared by its ``begin``): positions and mask come from the cache, keys and
        values are stored in it, and the caller advances it by T. With doc_ids (B, T) (packed rows,
        consecutive tokens of a document share an id): a token attends only to the earlier tokens of its own
        document, and positions restart at each document."""
        _B, T = idx.size()
        if kv_cache is None and self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
        if doc_ids is not None and kv_cache is not None:
            raise ValueError("doc_ids (packed documents) are for training: they cannot be used with a "
                             "kv_cache")  # fmt: skip
        x = self.transformer.wte(idx)  # (B, T, C)
        rope, attn_mask = None, None
        if doc_ids is not None:
            pos, attn_mask = document_positions_and_mask(doc_ids)  # (B, T), (B, 1, T, T)
        elif kv_cache is not None:
            pos, attn_mask = kv_cache.positions, kv_cache.attn_mask  # (B, T), (B or 1, 1, T, S) or None
        else:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        elif pos.dim() == 2:  # per-row positions: (B, T, 1, hs/2), broadcast over heads
            rope = (self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2))
        else:  # (T, 1, hs/2)
            rope = (self.rope_cos[:T, None], self.rope_sin[:T, None])
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, attn_mask)
        if last_only and targets is None:
            x = x[:, -1:]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        logits = linear(self.lm_head, x)  # (B, T, vocab_size)
        if targets is None:
            return logits
        # the loss in fp32 whatever the autocast dtype: log-softmax over 50k entries is sensitive
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
