"""Test helpers for Hugging Face interop, all offline: GPT-2's tokenizer as a Hugging Face pair
(vocab.json + merges.txt) and small random Llama-family models saved with save_pretrained.

``write_hf_gpt2_files(directory)`` writes the pair from the repository's tiktoken rank file
(data/gpt2/gpt2.tiktoken), so tests can exercise the "hf" tokenizer kind and compare with
``transformers`` without any download. ``save_tiny_llama_family(directory, "llama")`` writes a
random LlamaForCausalLM (or MistralForCausalLM, Qwen2ForCausalLM) with config.json and
model.safetensors (sharded with ``max_shard_size``).
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

import torch

from gpt.hf_tokenizer import bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parent.parent
GPT2_RANK_FILE = REPO_ROOT / "data" / "gpt2" / "gpt2.tiktoken"


def _split_in_two(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Run BPE on ``token`` with only the merges ranked below its own: the two parts left are the
    merge that creates it (the standard way to recover merges from tiktoken ranks)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"cannot split {token!r} into two lower-ranked tokens")
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def gpt2_hf_pair() -> tuple[str, str]:
    """(vocab.json text, merges.txt text) for GPT-2, built from the rank file."""
    ranks: dict[bytes, int] = {}
    for line in GPT2_RANK_FILE.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    b2u = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    merges = ["#version: 0.2"]
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split_in_two(ranks, tok, rank)
            merges.append(f"{spell(left)} {spell(right)}")
    return json.dumps(vocab, ensure_ascii=False), "\n".join(merges) + "\n"


def write_hf_gpt2_files(directory: str | Path) -> Path:
    """Write GPT-2's vocab.json and merges.txt into ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_hf_pair()
    (directory / "vocab.json").write_text(vocab, encoding="utf-8")
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    return directory


def noisy_(module: torch.nn.Module) -> None:
    """Perturb every parameter so that biases and norm gains are not their trivial initial values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


# small configs of each family: 8 heads of 8 over width 64, 2 layers, 128 positions; weights drawn
# wide enough (std 0.3) that greedy decoding wanders over the vocabulary instead of repeating one token
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.3)  # fmt: skip
FAMILIES = {
    # GQA 4:1, tied; Llama 3's rope scaling with wavelengths (head size 8: 6, 167, 4443, 10^5 positions)
    # in each of its three bands (kept, smoothed, scaled); vocabulary not a multiple of 64 (ours pads it)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=96, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.25, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # GQA 2:1, untied, no sliding window
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=128, num_key_value_heads=4, tie_word_embeddings=False, sliding_window=None)),
    # biases on q, k, v; GQA 4:1, untied
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=100, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1000000.0)),
}  # fmt: skip


def save_tiny_llama_family(directory: str | Path, family: str, max_shard_size: str | None = None,
                           **overrides):  # fmt: skip
    """A random, perturbed ``family`` model (llama, mistral or qwen2) in eval mode, saved to
    ``directory`` with save_pretrained (sharded when ``max_shard_size`` is given); returns it."""
    import transformers

    config_class, model_class, options = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **options, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    noisy_(model)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kw)
    return model


# Qwen2.5's chat template in its tool-calling part (Hermes <tool_call> blocks, tools in the system turn),
# shortened: what an imported instruct model brings.
HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call>"
    " XML tags.<|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}"
    "{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_hermes_tokenizer(directory: str | Path) -> Path:
    """A small ChatML byte-level BPE tokenizer.json whose tokenizer_config.json holds HERMES_TEMPLATE
    (as Qwen2.5's does: <tool_call> is an added, non-special token)."""
    from tokenizers import Tokenizer as Library
    from tokenizers import decoders, models, pre_tokenizers, trainers

    library = Library(models.BPE())
    library.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    library.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*3"}}\n</tool_call>',
              "What is 12 * 3? It is 36. You are a helpful assistant. system user assistant"] * 8  # fmt: skip
    library.train_from_iterator(corpus, trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    library.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": HERMES_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory
