"""Hugging Face Llama-family import (gpt.interop.llama through gpt.interop.hf.import_hf) checked against
transformers itself: logits within 1e-4 and 32 greedy tokens identical to ``generate`` for a Llama
(GQA 4:1, tied, Llama 3 rope scaling), a Mistral and a Qwen2 (biases on q, k, v); a sharded directory
loads the same weights; each config or file we cannot import is refused in one line naming the field
or file; ``sample.py ckpt=hf:DIR`` of a Llama directory with a tokenizer.json continues a prompt as
transformers does. Tiny random models (2 layers, width 64, 8 heads) built by transformers, nothing
downloaded."""

import json
import shutil

import pytest
import torch
from helpers_hf import save_tiny_llama_family

from gpt.commands.cli import compose_config, run
from gpt.commands.sample import SAMPLE
from gpt.errors import CheckpointError, ConfigError
from gpt.infer.config import GenerationConfig
from gpt.infer.generate import generate
from gpt.infer.sample import sample
from gpt.interop.hf import import_hf
from gpt.model import GPT
from gpt.tokenizer_load import gpt2_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple]:
    """family -> (directory, the transformers model saved there)."""
    out = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        out[family] = directory, save_tiny_llama_family(directory, family)
    return out


def ours(directory) -> GPT:
    config, state_dict, _ = import_hf(directory, with_tokenizer=False)
    model = GPT(config).eval()
    model.load_state_dict(state_dict)
    return model


def prompt_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(saved, family):
    directory, ref = saved[family]
    model = ours(directory)
    hf_vocab, c = ref.config.vocab_size, model.config
    # what the config says arrived as our options
    assert (c.n_kv_head, c.mlp, c.mlp_hidden, c.norm, c.pos_emb) == (
        ref.config.num_key_value_heads, "swiglu", 96, "rmsnorm", "rope")
    assert c.qkv_bias == (family == "qwen2") and c.tie_embeddings == (family == "llama")
    assert c.norm_eps == 1e-5 and c.vocab_size % 64 == 0 and c.vocab_size >= hf_vocab
    if family == "llama":
        assert (c.rope_theta, c.rope_scaling_factor, c.rope_original_max_position) == (500000.0, 8.0, 64)
    idx = prompt_ids(hf_vocab, 100)
    with torch.no_grad():
        got, want = model(idx), ref(idx).logits  # (2, 100, vocab)
    torch.testing.assert_close(got[..., :hf_vocab], want, atol=1e-4, rtol=0)
    if c.vocab_size > hf_vocab:  # the padded rows never win
        assert (got[..., hf_vocab:].amax(-1) < got[..., :hf_vocab].amax(-1)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_match_transformers_generate(saved, family):
    directory, ref = saved[family]
    model = ours(directory)
    prompt = prompt_ids(ref.config.vocab_size, 12, seed=1)[:1]  # (1, 12)
    with torch.no_grad():
        # an explicit mask: else generate masks the prompt's tokens that equal pad_token_id
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                            min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = want[0, 12:].tolist()
    # our decode loop with the KV cache; GPT-2's tokenizer only turns ids into text here
    settings = GenerationConfig(max_new_tokens=32, temperature=0.0, top_k=0)
    got = generate(model, gpt2_tokenizer(), prompt[0].tolist(), settings)[0]
    assert len(want) == 32 and len(set(want)) > 8  # not one token repeated: a real check of the cache
    assert got == want


def test_sharded_directory_loads_the_same_weights(saved, tmp_path):
    directory, ref = saved["llama"]
    sharded = tmp_path / "sharded"
    save_tiny_llama_family(sharded, "llama", max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    whole, split = ours(directory), ours(sharded)
    idx = prompt_ids(ref.config.vocab_size, 20)
    with torch.no_grad():
        assert torch.equal(whole(idx), split(idx))
    shards[1].unlink()
    missing = f"shard {shards[1].name} named in .*index.json is missing"
    with pytest.raises(CheckpointError, match=missing) as e:
        import_hf(sharded, with_tokenizer=False)
    assert "\n" not in str(e.value)


def edited(saved, tmp_path, family: str, **changes):
    """A copy of ``family``'s directory whose config.json has ``changes`` (None deletes a key)."""
    directory = tmp_path / family
    shutil.copytree(saved[family][0], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("family, changes, error, match", [
    ("llama", {"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}, ConfigError,
     r"architectures=\['GemmaForCausalLM'\] cannot be imported"),
    ("llama", {"hidden_act": "gelu"}, ConfigError, "hidden_act='gelu'"),
    ("llama", {"attention_bias": True}, ConfigError, "attention_bias=true with mlp_bias=false"),
    ("llama", {"mlp_bias": True}, ConfigError, "attention_bias=false with mlp_bias=true"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, ConfigError,
     "rope_parameters.rope_type='yarn'"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, ConfigError,
     "rope_scaling.rope_type='dynamic'"),
    ("llama", {"head_dim": 16}, ConfigError, "head_dim=16"),
    ("llama", {"num_key_value_heads": 3}, ConfigError, "num_key_value_heads=3"),
    ("llama", {"num_hidden_layers": None}, ConfigError, r"non-integer keys \['num_hidden_layers'\]"),
    ("mistral", {"sliding_window": 64}, ConfigError, "sliding_window=64 is shorter than max_position_emb"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, ConfigError, "sliding_window=16"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, ConfigError, "layer_types"),
    # shapes that disagree with the tensors name the tensor and the fields behind its shape
    ("llama", {"intermediate_size": 128}, CheckpointError,
     r"model.layers.0.mlp.gate_proj.weight is \(96, 64\) but config.json \(intermediate_size"),
    ("llama", {"num_key_value_heads": 4}, CheckpointError, r"k_proj.weight is \(16, 64\) but config.json "
     r"\(num_key_value_heads"),
    ("mistral", {"vocab_size": 256}, CheckpointError, r"embed_tokens.weight is \(128, 64\) but config.json "
     r"\(vocab_size"),
    ("qwen2", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, CheckpointError,
     r"has tensors config.json lacks: \['model.layers.0.self_attn.k_proj.bias'"),
])  # fmt: skip
def test_what_cannot_be_imported_is_one_line_naming_it(saved, tmp_path, family, changes, error, match):
    directory = edited(saved, tmp_path, family, **changes)
    with pytest.raises(error, match=match) as e:
        import_hf(directory, with_tokenizer=False)
    assert "\n" not in str(e.value)


def save_bpe_tokenizer(directory, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on a few lines, built offline
    with the tokenizers library as transformers would save a Llama-family model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + [TEXT] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


TEXT = "ROMEO: But soft, what light through yonder window breaks?"


def test_sample_py_with_hf_dir_continues_as_transformers(tmp_path, capsys):
    """`sample.py ckpt=hf:DIR temperature=0` of a Llama directory with its tokenizer.json prints the
    prompt and the 32 tokens transformers' greedy generate gives."""
    directory = tmp_path / "llama"
    save_bpe_tokenizer(directory, 300)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    # as many embedding rows as tokens: ours never picks an id past the tokenizer's, transformers may
    ref = save_tiny_llama_family(directory, "llama", vocab_size=len(hf_tok))
    prompt = torch.tensor([hf_tok(TEXT, add_special_tokens=False)["input_ids"]])  # (1, T)
    with torch.no_grad():
        ids = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = hf_tok.decode(ids[0, prompt.size(1) :])
    cfg = {**compose_config(SAMPLE, [])[0], "ckpt": f"hf:{directory}", "prompt": TEXT, "temperature": 0.0,
           "top_k": 0, "max_new_tokens": 32, "stop": [], "device": "cpu", "dtype": "fp32"}  # fmt: skip
    run(sample, cfg)
    out = capsys.readouterr().out
    assert len(set(ids[0, prompt.size(1) :].tolist())) > 8 and out.rstrip("\n") == TEXT + want


def test_llama_with_every_bias_imports_with_bias_true(tmp_path):
    """attention_bias and mlp_bias both true: every linear layer but the head has a bias (bias=True)."""
    ref = save_tiny_llama_family(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    model = ours(tmp_path)
    assert model.config.bias and model.transformer.h[0].mlp.c_fc.bias.shape == (2 * 96,)
    idx = prompt_ids(96, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :96], ref(idx).logits, atol=1e-4, rtol=0)
