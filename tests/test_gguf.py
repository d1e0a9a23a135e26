"""`gpt export out=FILE.gguf` judged by llama.cpp itself (llama-cpp-python, the [gguf] extra): the
file loads, llama.cpp's logits are ours (f32 within 1e-4; f16, bf16 and q8_0 close), its tokenizer
gives our ids for text and for the chat template it reads from the file, and its greedy chat reply
(create_chat_completion at temperature 0, as a user would call it) is what ``sample.py mode=chat
temperature=0`` replies. For a Llama-shaped chat model (GQA, biases on q, k, v, Llama 3's rope
scaling), a GPT-2-shaped one and an imported Hugging Face Llama. Tiny runs on the CPU."""

import json
import os

import pytest
import torch

from gpt.chat_template import render_prompt
from gpt.commands.export import check_with_llama_cpp, export_main
from gpt.config import TrainRunConfig
from gpt.errors import ConfigError
from gpt.infer.sample import sample
from gpt.interop.gguf import export_gguf
from gpt.interop.tokenizer_export import SAMPLES
from gpt.model import GPT, GPTConfig
from gpt.runs.load import load
from gpt.tokenizer import TOOL_TOKENS
from gpt.train.loop import train

if os.environ.get("GPT_REQUIRE_LLAMA_CPP"):  # CI installs it: there the tests must run
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's binding: pip install -e '.[llama]'")
pytestmark = pytest.mark.usefixtures("one_thread")

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
S = lambda text: {"role": "system", "content": text}
DIALOGS = [
    [U("What is 12 + 30?"), A("42")],
    [S("You are Ada."), U("Who are you?"), A("I am Ada.")],
    [U("My name is Bob."), A("Hi Bob!"), U("What is my name?"), A("Bob.")],
    [S("Be brief."), U("Hello, world!"), A("Hi!"), U("2 + 2?"), A("4")],
]
LLAMA_SHAPE = dict(block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos_emb="rope", norm="rmsnorm",
                   mlp="swiglu", qkv_bias=True, tie_embeddings=False)  # fmt: skip
GPT2_SHAPE = dict(block_size=96, n_layer=2, n_head=2, n_embd=64, pos_emb="learned", norm="layernorm",
                  activation="gelu_tanh", bias=True)  # fmt: skip


def _train(tmp, name: str, model: dict, steps: int = 60):
    path = tmp / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGS * 4))
    cfg = TrainRunConfig.from_dict({
        "out_dir": str(tmp / name), "seed": 3, "device": "cpu", "experiment": "sft", "model": model,
        "data": dict(name="chat_bpe", format="dialogs", path=str(path), tokenizer="bpe", vocab_size=300,
                     val_fraction=0.0),
        "optim": dict(lr=1e-2, warmup_steps=5, weight_decay=0.0),
        "train": dict(max_steps=steps, batch_size=8, eval_interval=0, log_interval=50, ckpt_interval=0,
                      progress=False, peak_flops=1e12),
        "wandb": dict(mode="disabled"),
    })  # fmt: skip
    train(cfg)
    return tmp / name


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama-shaped chat model (GQA 2:1, biases on q, k, v, untied) and its f32 GGUF file."""
    tmp = tmp_path_factory.mktemp("gguf")
    run = _train(tmp, "llama", LLAMA_SHAPE)
    export_main([f"ckpt={run}", f"out={tmp / 'chat.gguf'}", "gguf_type=f32"])
    return run, tmp / "chat.gguf"


def _llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=96, n_threads=1, verbose=False, seed=0, **kw)


def test_llama_cpp_logits_are_ours(llama_run):
    run, gguf_file = llama_run
    assert check_with_llama_cpp(load(str(run)).build(), gguf_file) < 1e-4


def test_llama_cpp_tokenizes_text_and_chat_prompts_as_we_do(llama_run):
    run, gguf_file = llama_run
    ours, llm = load(str(run)).tokenizer, _llama(gguf_file, vocab_only=True)
    for text in SAMPLES:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text), text
    forged = "<|end_of_turn|> and <|endoftext|> typed by a user"
    assert llm.tokenize(forged.encode(), add_bos=False, special=False) == ours.encode(forged)
    template = llm.metadata["tokenizer.chat_template"]
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for dialog in DIALOGS:
        history = dialog[:-1]
        text = ImmutableSandboxedEnvironment().from_string(template).render(messages=history,
                                                                             add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == render_prompt(ours, history)


CALL = lambda args, call_id: {"id": call_id, "type": "function",
                              "function": {"name": "calculator", "arguments": args}}  # fmt: skip
TOOL_DIALOG = [
    S("Use the calculator."), U("What is 123 * 456 + 7?"),
    {"role": "assistant", "content": " Let me see.", "tool_calls": [CALL({"expression": "123*456"}, "call_1"),
                                                                    CALL('{"expression": "7"}', "call_2")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "56088"}, {"role": "tool", "tool_call_id": "call_2",
                                                                     "content": "7"},
    {"role": "assistant", "content": None, "tool_calls": [CALL({"expression": "56088+7"}, "call_3")]},
    {"role": "tool", "tool_call_id": "call_3", "content": "56095"}, A("It is 56095."), U("Thanks!"),
]  # fmt: skip


def test_llama_cpp_reads_tool_calls_with_the_tool_tokens_as_control_tokens(llama_run):
    """The tool tokens are control tokens of the file: one id each from their text with special=True (as
    a chat template's output is tokenized), plain text from a user (special=False); and the file's chat
    template, rendered by llama-cpp-python's own Jinja formatter (create_chat_completion's), gives our
    render_prompt ids for each history of a tool dialog (after results: no marker, the reply goes on)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    run, gguf_file = llama_run
    ours, llm = load(str(run)).tokenizer, _llama(gguf_file, vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    for name in TOOL_TOKENS:
        i = ours.special_id(name)
        assert llm.tokenize(name.encode(), add_bos=False, special=True) == [i]
        assert llm.tokenize(name.encode(), add_bos=False, special=False) == ours.encode(name) != [i]
        assert llama_cpp.llama_vocab_get_attr(vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>",
                                    bos_token="<|endoftext|>")  # fmt: skip
    for cut in (2, 5, 7, 9):  # after a user turn, after results (twice), after a reply that went on
        history = TOOL_DIALOG[:cut]
        text = formatter(messages=history).prompt
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == render_prompt(ours, history), cut


@pytest.mark.parametrize(("system", "prompt"), [("You are Ada.", "Who are you?"), (None, "What is 12 + 30?"),
                                              (None, "My name is Bob.")])
def test_llama_cpp_greedy_chat_reply_is_sample_chat_reply(llama_run, system, prompt, capsys):
    run, gguf_file = llama_run
    sample({"ckpt": str(run), "mode": "chat", "temperature": 0.0, "max_new_tokens": 12, "history_file": None,
            "prompt": prompt, "system": system})  # fmt: skip
    ours = capsys.readouterr().out.strip()
    messages = ([S(system)] if system else []) + [U(prompt)]
    reply = _llama(gguf_file).create_chat_completion(messages=messages, temperature=0.0, max_tokens=12)
    assert reply["choices"][0]["message"]["content"].strip() == ours and ours


@pytest.mark.parametrize(("gguf_type", "tolerance"), [("f16", 0.05), ("bf16", 0.2), ("q8_0", 0.1)])
def test_smaller_types_stay_close(llama_run, tmp_path, gguf_type, tolerance):
    run, f32 = llama_run
    model = load(str(run)).build()
    out = tmp_path / f"chat-{gguf_type}.gguf"
    export_gguf(model, load(str(run)).tokenizer, out, gguf_type)
    assert out.stat().st_size < f32.stat().st_size * (0.75 if gguf_type != "q8_0" else 0.6)
    assert check_with_llama_cpp(model, out) < tolerance


def test_llama3_rope_scaling_and_all_biases(llama_run, tmp_path):
    """Llama 3's scaled frequencies go as llama.cpp's rope_freqs; bias=true as Llama's optional biases."""
    run, _ = llama_run
    tokenizer = load(str(run)).tokenizer
    torch.manual_seed(0)
    config = GPTConfig(**{**LLAMA_SHAPE, "qkv_bias": False, "bias": True, "vocab_size": 320, "block_size": 96,
                          "rope_scaling_factor": 8.0, "rope_original_max_position": 16})  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from 0 and 1
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert check_with_llama_cpp(model, tmp_path / "m.gguf") < 1e-4


def test_gpt2_shaped_model_goes_as_llama_cpp_gpt2(tmp_path):
    run = _train(tmp_path, "gpt2", GPT2_SHAPE, steps=20)
    export_main([f"ckpt={run}", f"out={tmp_path / 'g.gguf'}", "gguf_type=f32", "check=true"])
    llm = _llama(tmp_path / "g.gguf", vocab_only=True)
    assert llm.metadata["general.architecture"] == "gpt2"
    # llama.cpp's CPU GELU reads a table of f16 values: 1e-3, not 1e-4
    assert check_with_llama_cpp(load(str(run)).build(), tmp_path / "g.gguf") < 1e-3


def test_imported_hugging_face_llama_goes_to_gguf(tmp_path):
    from helpers_hf import save_tiny_llama_family, write_hf_gpt2_files

    save_tiny_llama_family(tmp_path / "hf", "llama", vocab_size=50257 + 1)
    write_hf_gpt2_files(tmp_path / "hf")
    export_main([f"ckpt=hf:{tmp_path / 'hf'}", f"out={tmp_path / 'l.gguf'}", "gguf_type=f32"])
    loaded = load(f"hf:{tmp_path / 'hf'}")
    assert check_with_llama_cpp(loaded.build(), tmp_path / "l.gguf") < 1e-4


SPLITS = {  # Llama 3's and Qwen2's split patterns, as their tokenizer.json files spell them
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
}  # fmt: skip


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_hugging_face_tokenizers_tokenize_in_llama_cpp_as_in_tokenizers(tmp_path, pre):
    """A tokenizer.json of Llama 3's, Qwen2's or SmolLM2's kind goes in the file with the name of its
    pre-tokenizer, and llama.cpp's ids are those of Hugging Face's tokenizers library."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Library

    from gpt.interop.hf_vocab import hf_tokenizer

    library = Library(models.BPE(ignore_merges=pre == "llama-bpe"))
    if pre == "smollm":
        steps = [pre_tokenizers.Digits(individual_digits=True),
                 pre_tokenizers.ByteLevel(add_prefix_space=False)]  # fmt: skip
    else:
        steps = [pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]  # fmt: skip
    library.pre_tokenizer, library.decoder = pre_tokenizers.Sequence(steps), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    library.train_from_iterator([*SAMPLES, *(json.dumps(d) for d in DIALOGS)] * 3, trainer)
    library.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tokenizer = hf_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**LLAMA_SHAPE, "vocab_size": 448}))
    export_gguf(model, tokenizer, tmp_path / "t.gguf", "f32")
    llm = _llama(tmp_path / "t.gguf", vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    for text in [*SAMPLES, "<|im_end|> typed by a user", "12345 + 678 = 13023"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    assert llm.token_eos() == tokenizer.eot_id


def test_refusals_write_nothing(llama_run, tmp_path):
    run, _ = llama_run
    loaded = load(str(run))
    model, tokenizer = loaded.build(), loaded.tokenizer
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf(model, tokenizer, tmp_path / "taken.gguf")
    os.symlink(tmp_path / "taken.gguf", tmp_path / "link.gguf")
    with pytest.raises(ConfigError, match="not a regular file"):
        export_gguf(model, tokenizer, tmp_path / "link.gguf", overwrite=True)
    with pytest.raises(ConfigError, match="gguf_type"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_0")
    relu2 = GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=32, pos_emb="rope",
                          norm="rmsnorm", activation="relu2"))  # fmt: skip
    with pytest.raises(ConfigError, match="cannot be exported to GGUF.*mlp"):
        export_gguf(relu2, tokenizer, tmp_path / "y.gguf")
    from gpt.tokenizer import char_tokenizer

    with pytest.raises(ConfigError, match="char tokenizer has no GGUF counterpart"):
        export_gguf(model, char_tokenizer(["abc"]), tmp_path / "z.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "taken.gguf"]
