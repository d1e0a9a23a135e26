"""`gpt export` of a chat model keeps its chat template: tokenizer_config.json's ``chat_template``
renders, through transformers' ``apply_chat_template``, the very ids our ``render_prompt`` and
``render_dialog`` give (system prompt, several turns, <|endoftext|> and <|end_of_turn|> as the same
special ids), and transformers' greedy ``generate`` replies what ``sample.py mode=chat temperature=0``
replies. A model that brought its own template keeps it. Tiny runs on the CPU, nothing downloaded."""

import json

import pytest
import torch

from gpt.chat_template import render_dialog, render_prompt, render_turns
from gpt.commands.export import export_main
from gpt.config import TrainRunConfig
from gpt.hf_tokenizer import HFTokenizer
from gpt.infer.sample import sample
from gpt.interop.tokenizer_export import tokenizer_files
from gpt.runs.load import load
from gpt.tokenizer import EOT, EOT_TURN, GPT2_PATTERN, NEW_SPECIALS, TOOL_TOKENS, TiktokenTokenizer
from gpt.train.loop import train

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
S = lambda text: {"role": "system", "content": text}
DIALOGS = [
    [U("What is 12 + 30?"), A("42")],
    [S("You are Ada."), U("Who are you?"), A("I am Ada.")],
    [U("My name is Bob."), A("Hi Bob!"), U("What is my name?"), A("Bob.")],
    [S("  Be brief.\n"), U("Hello,   world!\n"), A(" Hi!  "), U("2 + 2?"), A("4")],
]

T = lambda call_id, text: {"role": "tool", "tool_call_id": call_id, "content": text}


def C(arguments, call_id="call_1", name="calculator"):
    """An assistant's tool call as OpenAI's clients (arguments a JSON string) or transformers' (an object)
    send it."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def R(content, *calls):
    """An assistant message that calls tools."""
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


TOOL_DIALOGS = [
    [U("What is 123 * 456?"), R(None, C({"expression": "123*456"})), T("call_1", "56088"),
     A(" It is 56088. ")],
    [S("Use the tools."), U("2+2 and 3*3?"),
     R("  Let me compute both. ", C({"expression": "2+2"}),
       C({"expression": "3*3", "note": "naïve 日本"}, "call_2")),
     T("call_1", "4"), T("call_2", " 9\n"), A("4 and 9."), U("Thanks!"), A("You're welcome.")],
    # arguments as JSON strings in json.dumps's spelling; the reply calls again after the first result
    [U("(1+1)*2?"), R("", C(json.dumps({"expression": "1+1"}))), T("call_1", "2"),
     R("Then", C(json.dumps({"expression": "2*2"}), "call_2", name="calc")), T("call_2", "4"), A("4.")],
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our run directory, the exported directory) of a tiny chat model with a trained BPE tokenizer."""
    tmp = tmp_path_factory.mktemp("chat_export")
    path = tmp / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGS * 4))
    cfg = TrainRunConfig.from_dict({
        "out_dir": str(tmp / "run"), "seed": 3, "device": "cpu", "experiment": "sft",
        "model": dict(block_size=96, n_layer=2, n_head=2, n_embd=48),
        "data": dict(name="chat_bpe", format="dialogs", path=str(path), tokenizer="bpe", vocab_size=300,
                     val_fraction=0.0),
        "optim": dict(lr=1e-2, warmup_steps=5, weight_decay=0.0),
        "train": dict(max_steps=60, batch_size=8, eval_interval=0, log_interval=50, ckpt_interval=0,
                      progress=False, peak_flops=1e12),
        "wandb": dict(mode="disabled"),
    })  # fmt: skip
    train(cfg)
    export_main([f"ckpt={tmp / 'run'}", f"out={tmp / 'hf'}"])
    return tmp / "run", tmp / "hf"


def test_apply_chat_template_gives_our_prompt_and_dialog_ids(exported):
    run, out = exported
    ours = load(str(run)).tokenizer
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    for name in (EOT, EOT_TURN):  # the special tokens our template writes, at our ids
        assert theirs.convert_tokens_to_ids(name) == ours.special_id(name)
    for dialog in DIALOGS:
        for cut in range(1, len(dialog) + 1):
            history = dialog[:cut]
            if history[-1]["role"] == "user":
                got = theirs.apply_chat_template(history, add_generation_prompt=True, return_dict=True)
                assert got["input_ids"] == render_prompt(ours, history), history
            else:
                got = theirs.apply_chat_template(history, return_dict=True)
                assert got["input_ids"] == render_dialog(ours, history)[0], history
    with pytest.raises(Exception, match="unknown role robot"):
        theirs.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(Exception, match="a tool message must follow an assistant message with tool_calls"):
        theirs.apply_chat_template([U("x"), T("call_1", "x")])


def test_apply_chat_template_gives_our_ids_for_tool_calls_and_results(exported):
    """Every cut of a tool dialog: a reply that calls (no text, or text before one or two calls), the
    results, the reply going on after them, the prompt after results (no marker): transformers' ids are
    render_turns' / render_prompt's, the tool tokens special added tokens at our ids."""
    run, out = exported
    ours = load(str(run)).tokenizer
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    assert ours.has_tools
    for name in TOOL_TOKENS:
        assert theirs.convert_tokens_to_ids(name) == ours.special_id(name)
        assert theirs.added_tokens_decoder[ours.special_id(name)].special  # skipped by skip_special_tokens
        assert theirs.encode(name, add_special_tokens=False) == [ours.special_id(name)]
    for dialog in TOOL_DIALOGS:
        for cut in range(1, len(dialog) + 1):
            history = dialog[:cut]
            prompt = history[-1]["role"] in ("user", "tool")
            got = theirs.apply_chat_template(history, tokenize=True, add_generation_prompt=prompt,
                                             return_dict=True)["input_ids"]  # fmt: skip
            want = render_prompt(ours, history) if prompt else render_turns(ours, history)[0]
            assert got == want, history


def test_a_gpt2_pattern_tokenizer_exports_its_specials_and_template(tmp_path):
    """GPT-2's split pattern goes as vocab.json + merges.txt (GPT2Tokenizer): our special tokens are its
    special added tokens at our ids, and its chat template gives our ids, tool dialogs included."""
    ranks = {bytes([b]): b for b in range(256)}  # bytes only: no merges, nothing to train
    ours = TiktokenTokenizer("gpt2", ranks, GPT2_PATTERN, {s: 256 + i for i, s in enumerate(NEW_SPECIALS)})
    files, note = tokenizer_files(ours)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert note is None and all(theirs.encode(s, add_special_tokens=False) == [ours.special_id(s)]
                                for s in NEW_SPECIALS)  # fmt: skip
    for dialog in DIALOGS + TOOL_DIALOGS:
        whole = theirs.apply_chat_template(dialog, return_dict=True)["input_ids"]
        assert whole == render_dialog(ours, dialog)[0], dialog
        prompt = dialog[:-1]  # ends with a user turn or tool results
        got = theirs.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert got == render_prompt(ours, prompt), prompt


def test_transformers_generate_replies_as_sample_chat(exported, capsys):
    run, out = exported
    ours = load(str(run)).tokenizer
    sample({"ckpt": str(run), "mode": "chat", "temperature": 0.0, "max_new_tokens": 12, "history_file": None,
            "prompt": "Who are you?", "system": "You are Ada."})  # fmt: skip
    our_reply = capsys.readouterr().out.strip()
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = theirs.apply_chat_template([S("You are Ada."), U("Who are you?")], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)  # fmt: skip
    stop = [ours.special_id(EOT_TURN), ours.eot_id]  # end of turn, or of the text
    assert sorted(model.generation_config.eos_token_id) == sorted(stop)  # generation_config.json
    ids = model.generate(**prompt, do_sample=False, max_new_tokens=12)
    reply = ids[0, prompt["input_ids"].shape[1] :].tolist()
    if reply[-1] in stop:
        reply = reply[:-1]
    assert theirs.decode(reply).strip() == our_reply and our_reply


def test_a_model_that_brought_its_own_template_keeps_it(exported):
    run, out = exported
    definition = json.loads((out / "tokenizer.json").read_text())
    own = "{% for m in messages %}<|end_of_turn|>{{ m['content'] }}{% endfor %}"
    tokenizer = HFTokenizer(definition, EOT, chat_template=own, chat_template_file="tokenizer_config.json")
    files, note = tokenizer_files(tokenizer)
    assert note is None and json.loads(files["tokenizer_config.json"])["chat_template"] == own
    plain = json.loads(tokenizer_files(HFTokenizer(definition, EOT))[0]["tokenizer_config.json"])
    assert plain["chat_template"] == json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_the_exported_folder_imported_back_renders_chats_as_the_run_did(exported):
    """hf:OUT recognises our own template in tokenizer_config.json and renders with gpt.chat_template,
    so a model exported and imported again sees the very ids it was trained on."""
    run, out = exported
    ours, back = load(str(run)).tokenizer, load(f"hf:{out}").tokenizer
    for dialog in DIALOGS:
        assert render_dialog(back, dialog) == render_dialog(ours, dialog)
        assert render_prompt(back, dialog[:-1]) == render_prompt(ours, dialog[:-1])
    assert back.chat_template is None and back.has_tools
    for dialog in TOOL_DIALOGS:
        assert render_dialog(back, dialog) == render_dialog(ours, dialog)
        assert render_prompt(back, dialog[:3]) == render_prompt(ours, dialog[:3])
