"""`gpt export` of Llama-shaped models (gpt.interop.llama's mapping run backwards) checked against
transformers itself: an imported Llama (GQA 4:1, tied, Llama 3 rope scaling) and Qwen2 (biases on q, k,
v) export back with logits within 1e-4 and import again; a run trained here with model=llama_tiny and a
LoRA run on an imported Llama (merged on export) load in transformers with our logits; the tokenizer
goes along (tokenizer.json, or one line saying it stays ours); what neither GPT-2 nor Llama can express
is refused, naming every option. Tiny random models built by transformers, nothing downloaded."""

import json

import pytest
import torch
import yaml
from helpers_hf import noisy_, save_tiny_llama_family

from gpt.checkpoint import save_checkpoint
from gpt.commands.export import export_main
from gpt.data.tokenizers import train_bpe
from gpt.interop.hf import import_hf
from gpt.interop.tokenizer_export import SAMPLES
from gpt.model import GPT, GPTConfig
from gpt.runs.load import load
from gpt.train.loop import train
from gpt.typed_config import REPO_ROOT

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east."


def save_tokenizer(directory) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json, eos </s>, bos <s>) trained offline with
    the tokenizers library; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([TEXT, *SAMPLES] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))
    return len(fast)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple]:
    """family -> (directory with config.json, model.safetensors and a tokenizer.json, the model)."""
    out = {}
    for family in ARCH:
        directory = tmp_path_factory.mktemp(family)
        n_vocab = save_tokenizer(directory)
        out[family] = directory, save_tiny_llama_family(directory, family, vocab_size=n_vocab)
    return out


def transformers_model(directory, family: str):
    return getattr(transformers, ARCH[family]).from_pretrained(str(directory), dtype=torch.float32).eval()


def assert_same_logits(ours: GPT, theirs, n_vocab: int, atol: float = 1e-4) -> None:
    idx = torch.randint(0, n_vocab, (2, 30), generator=torch.Generator().manual_seed(0))  # (2, 30)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[..., :n_vocab], theirs(idx).logits, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ARCH)
def test_an_imported_model_exports_back_and_round_trips(saved, tmp_path, capsys, family):
    directory, ref = saved[family]
    out = tmp_path / "hf"
    export_main([f"ckpt=hf:{directory}", f"out={out}", "check=true"])
    captured = capsys.readouterr()
    assert "check: " in captured.out and "note" not in captured.err  # the tokenizer went along
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCH[family]] and config["num_key_value_heads"] == 2
    if family == "llama":  # tied, Llama 3 rope scaling
        assert config["tie_word_embeddings"] and config["rope_scaling"]["factor"] == 8.0
    theirs, n_vocab = transformers_model(out, family), ref.config.vocab_size
    assert theirs.config.vocab_size == n_vocab  # the padding rows cut off
    ours = load(f"hf:{directory}").build()
    assert_same_logits(ours, theirs, n_vocab)
    assert_same_logits(ours, ref, n_vocab)  # and so the export computes what the original did
    # the tokenizer files give transformers our ids and our eos/bos
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == load(f"hf:{directory}").tokenizer.encode(TEXT) and hf_tok.eos_token == "</s>"
    # and back: hf:OUT imports as the same model
    config_again, state_dict, _ = import_hf(out, with_tokenizer=False)
    again = GPT(config_again)
    again.load_state_dict(state_dict)
    assert_same_logits(again, theirs, n_vocab)


def llama_tiny(**overrides) -> dict:
    return {**yaml.safe_load((REPO_ROOT / "conf" / "model" / "llama_tiny.yaml").read_text()), **overrides}


@pytest.mark.parametrize("overrides, family", [
    ({}, "qwen2"),  # the preset: biases on q, k, v only, untied
    ({"qkv_bias": False, "tie_embeddings": True, "rope_scaling_factor": 4.0,
      "rope_original_max_position": 16}, "llama"),  # tied, Llama 3 rope scaling
    ({"bias": True, "qkv_bias": False}, "llama"),  # every bias: Llama's attention_bias and mlp_bias
])  # fmt: skip
def test_a_llama_tiny_run_exports_with_our_logits(make_cfg, tmp_path, capsys, overrides, family):
    cfg = make_cfg("run", model=llama_tiny(**overrides), train=dict(max_steps=3, eval_interval=0))
    train(cfg)
    loaded = load(cfg.out_dir)
    capsys.readouterr()  # training's progress
    export_main([f"ckpt={cfg.out_dir}", f"out={tmp_path / 'hf'}"])
    err = capsys.readouterr().err  # a char tokenizer: one line saying it stays ours
    assert "stays ours" in err and len(err.strip().splitlines()) == 1
    theirs = transformers_model(tmp_path / "hf", family)
    assert (theirs.config.num_key_value_heads, theirs.config.tie_word_embeddings) == (
        2, overrides.get("tie_embeddings", False))  # fmt: skip
    assert_same_logits(loaded.build(), theirs, loaded.tokenizer.vocab_size)


def test_a_lora_run_on_an_imported_llama_is_merged_and_exported(saved, make_cfg, tmp_path):
    directory, ref = saved["llama"]
    lora = dict(method="lora", lora_rank=4, lora_alpha=8.0)
    cfg = make_cfg("lora", init_from=f"hf:{directory}", model=dict(n_head=8, n_embd=64), finetune=lora,
                   optim=dict(lr=3e-2, warmup_steps=1), train=dict(max_steps=3, eval_interval=0))  # fmt: skip
    train(cfg)
    export_main([f"ckpt={cfg.out_dir}", f"out={tmp_path / 'hf'}"])
    theirs = transformers_model(tmp_path / "hf", "llama")
    n_vocab = ref.config.vocab_size
    assert_same_logits(load(cfg.out_dir, merge=True).build(), theirs, n_vocab)
    idx = torch.arange(20).unsqueeze(0)  # (1, 20): the adapters did change the model
    with torch.no_grad():
        assert (theirs(idx).logits - ref(idx).logits).abs().max() > 1e-3


def save_run(directory, config: GPTConfig, tokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(config)
    noisy_(model)
    state = {"model": model.state_dict(), "model_config": config.to_dict(), "tokenizer": tokenizer.to_state()}
    save_checkpoint(directory / "ckpt.pt", state)


SMALL = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)


@pytest.mark.parametrize("options, listed", [
    (dict(pos_emb="rope", activation="gelu"),  # LayerNorm, a GELU MLP and biases with rotary positions
     ["model.pos_emb='rope'", "model.norm='layernorm' (Llama uses RMSNorm)",
      "model.mlp='standard' with model.activation='gelu'"]),
    (dict(pos_emb="rope", norm="rmsnorm", activation="relu2", bias=False),  # ReLU^2 instead of SwiGLU
     ["model.mlp='standard' with model.activation='relu2'", "model.norm='rmsnorm' (GPT-2 uses LayerNorm)"]),
    (dict(mlp="swiglu", n_kv_head=1),  # SwiGLU and GQA with learned positions and LayerNorm
     ["model.mlp='swiglu'", "model.n_kv_head=1", "model.pos_emb='learned'", "model.norm='layernorm'"]),
])  # fmt: skip
def test_what_neither_family_expresses_is_refused_naming_every_option(tmp_path, capsys, options, listed):
    from gpt.tokenizer import char_tokenizer

    save_run(tmp_path / "run", GPTConfig(**SMALL, **options), char_tokenizer(["abcdef"]))
    with pytest.raises(SystemExit) as exc:
        export_main([f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert all(item in err for item in listed), err
    assert not (tmp_path / "hf").exists()


def test_our_trained_bpe_goes_along_as_a_tokenizer_json(tmp_path, capsys, corpus):
    tokenizer = train_bpe([corpus.read_text()[:20_000]], 400)
    config = GPTConfig(**{**SMALL, "vocab_size": 448}, pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                       bias=False)  # fmt: skip
    save_run(tmp_path / "run", config, tokenizer)
    export_main([f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"])
    assert "note" not in capsys.readouterr().err
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in (*SAMPLES, TEXT, "  leading spaces\n\nand 123456 digits"):
        ids = tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
