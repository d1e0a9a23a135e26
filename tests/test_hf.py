"""Hugging Face GPT-2 import and export (gpt.interop.hf, gpt.export) checked against transformers itself:
logits of imported and exported models, tokenizer ids, the files written, and the errors for what
cannot be imported or exported. Tiny random GPT-2s (2 layers, width 32, GPT-2's 50257 tokens)."""

import json

import pytest
import torch
from helpers_hf import noisy_, write_hf_gpt2_files

from gpt.checkpoint import save_checkpoint
from gpt.commands.export import export_main
from gpt.errors import CheckpointError, ConfigError, DataError
from gpt.interop.hf import config_from_hf, import_hf
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer
from gpt.tokenizer_load import gpt2_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "emoji 😀👍🏽 CJK 日本語 中文 한국어, accents e\u0301 naïve café, RTL עברית العربية",
    "   runs     of\t\t\twhitespace   \n\n\n   and trailing   ",
    "numbers 1234567890 3.14159 -42 1e10 0xFF 1,000,000 don't we'll I'M",
    'def f(x: int) -> int:\n    """Doc."""\n    return {"a": [x ** 2, x // 3]}  # comment\n',
    "for (int i = 0; i < n; ++i) { s += a[i]; }\r\n\tif x != y && !z: pass",
]


def save_tiny_gpt2(directory, **overrides):
    """A random GPT2LMHeadModel saved with save_pretrained, plus GPT-2's tokenizer files."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **overrides)
    model = transformers.GPT2LMHeadModel(config).eval()
    noisy_(model)
    model.save_pretrained(str(directory))
    write_hf_gpt2_files(directory)
    return model


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_tiny")
    return directory, save_tiny_gpt2(directory)


def ids_for(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)[:64]])


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch_model.bin"])
def test_import_gives_the_logits_of_transformers(hf_model, tmp_path, fmt):
    directory, ref = hf_model
    if fmt == "pytorch_model.bin":  # the older format: a state dict read with weights_only=True
        for name in ("config.json", "vocab.json", "merges.txt"):
            (tmp_path / name).write_bytes((directory / name).read_bytes())
        weights = dict(ref.state_dict())
        weights["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # old mask buffer
        torch.save(weights, tmp_path / "pytorch_model.bin")
        directory = tmp_path
    config, state_dict, tokenizer = import_hf(directory)
    assert (config.vocab_size, tokenizer.vocab_size, tokenizer.kind) == (50304, 50258, "hf")
    assert (config.block_size, config.pos_emb, config.norm, config.bias, config.tie_embeddings) == (
        64, "learned", "layernorm", True, True)  # fmt: skip
    model = GPT(config).eval()
    model.load_state_dict(state_dict)
    idx = ids_for(tokenizer, TEXTS[0] + " " + TEXTS[3] + TEXTS[4])
    with torch.no_grad():
        ours, theirs = model(idx), ref(idx).logits  # (1, T, 50304) and (1, T, 50257)
    assert torch.allclose(ours[..., :50257], theirs, atol=1e-4, rtol=0)
    # padding rows (the mean embedding) are never the most likely token
    assert (ours[..., 50257:].amax(-1) < ours[..., :50257].amax(-1)).all()
    if fmt == "safetensors":  # the tokenizer of the directory gives the ids transformers gives
        ref_tok = transformers.GPT2Tokenizer.from_pretrained(str(directory))
        for text in TEXTS:
            assert tokenizer.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"], text


def test_import_errors_name_the_problem(hf_model, tmp_path):
    directory, ref = hf_model
    with pytest.raises(CheckpointError, match="config.json not found"):
        import_hf(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ConfigError, match="activation_function='relu'"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="vocab.json and merges.txt"):
        import_hf(tmp_path)
    write_hf_gpt2_files(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        import_hf(tmp_path)
    weights = {k: v for k, v in ref.state_dict().items() if k != "transformer.h.1.mlp.c_fc.weight"}
    weights["transformer.h.0.ln_1.weight"] = torch.ones(33)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer.h.1.mlp.c_fc.weight'\]") as e:
        import_hf(tmp_path)
    assert "transformer.h.0.ln_1.weight: checkpoint (33,) vs model (32,)" in str(e.value)
    torch.save({"weights": torch.zeros(1), "payload": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot be read as plain weights"):
        import_hf(tmp_path)  # weights_only refuses the pickled function: nothing runs


def gpt2_shaped(**options) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, **options)
    model = GPT(config).eval()
    noisy_(model)
    return model


def save_run(directory, model: GPT, tokenizer) -> None:
    state = {
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "tokenizer": tokenizer.to_state(),
    }
    save_checkpoint(directory / "ckpt.pt", state)


def test_export_loads_in_transformers_with_the_same_logits_and_tokenizer(tmp_path, capsys):
    model, tokenizer = gpt2_shaped(), gpt2_tokenizer()
    save_run(tmp_path / "run", model, tokenizer)
    export_main([f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"])
    assert "exported" in capsys.readouterr().out
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert ref.config.vocab_size == tokenizer.vocab_size == 50262  # padding rows cut off (tool tokens kept)
    idx = ids_for(tokenizer, TEXTS[1] + TEXTS[4])
    with torch.no_grad():
        ours, theirs = model(idx)[..., :50262], ref(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    # vocab.json + merges.txt rebuilt from our tiktoken ranks: transformers' GPT-2 tokenizer gives
    # our ids on Unicode, whitespace runs, numbers and code
    written = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    assert written["<|endoftext|>"] == 50256 and written["<|end_of_turn|>"] == 50257
    ref_tok = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in TEXTS:
        assert tokenizer.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert ref_tok.decode(tokenizer.encode(text)) == text
    # and back: importing the export gives the same model again
    config, state_dict, _ = import_hf(tmp_path / "hf")
    again = GPT(config).eval()
    again.load_state_dict(state_dict)
    with torch.no_grad():
        assert torch.allclose(again(idx)[..., :50262], ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu2"])
def test_export_of_untied_embeddings_without_biases(tmp_path, capsys, activation):
    """bias=false exports as zero biases, untied embeddings as tie_word_embeddings=false, and each
    model.activation as the activation_function transformers computes the same way."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=False,
                          tie_embeddings=False, activation=activation)).eval()  # fmt: skip
    noisy_(model)
    tokenizer = char_tokenizer(["abcdefghij klmnop"])
    save_run(tmp_path / "run", model, tokenizer)
    export_main([f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"])
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert not ref.config.tie_word_embeddings and ref.config.vocab_size == tokenizer.vocab_size
    idx = torch.tensor([tokenizer.encode("hello bad kid")])
    with torch.no_grad():
        ours, theirs = model(idx)[..., : tokenizer.vocab_size], ref(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    assert config_from_hf(ref.config.to_dict()).activation == activation  # and back on import


def test_export_refuses_what_gpt2_cannot_express_and_writes_nothing(tmp_path, capsys):
    model = GPT(
        GPTConfig(
            block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm", pos_emb="rope"
        )
    )
    save_run(tmp_path / "rope", model, char_tokenizer(["abc"]))
    with pytest.raises(SystemExit) as exc:
        export_main([f"ckpt={tmp_path / 'rope'}", f"out={tmp_path / 'hf'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "model.pos_emb='rope'" in err and "model.norm='rmsnorm'" in err
    assert not (tmp_path / "hf").exists()


def test_export_with_a_non_gpt2_tokenizer_and_the_out_dir_rules(tmp_path, capsys):
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    save_run(tmp_path / "char", model, char_tokenizer(["hello"]))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export_main([f"ckpt={tmp_path / 'char'}", f"out={tmp_path / 'hf'}"])
    assert "overwrite=true" in capsys.readouterr().err
    export_main([f"ckpt={tmp_path / 'char'}", f"out={tmp_path / 'hf'}", "overwrite=true", "check=true"])
    captured = capsys.readouterr()
    assert "no Hugging Face tokenizer files" in captured.err and "check: " in captured.out
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "keep.txt", "model.safetensors"]
    with pytest.raises(SystemExit):
        export_main([f"ckpt={tmp_path / 'char'}"])
    assert "missing mandatory value out" in capsys.readouterr().err
