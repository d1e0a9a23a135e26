"""Instruction tuning end to end on tiny CPU runs: the demo data generator, SFT through the one
training loop (init_from + data.format=dialogs), gpt eval dialogs, and chat in sample.py / the REPL."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from gpt.chat_template import check_messages, render_dialog, render_prompt
from gpt.commands.eval import run as eval_main
from gpt.config import TrainRunConfig
from gpt.data.dialogs import read_dialogs
from gpt.eval.dialogs import EvalConfig, evaluate
from gpt.infer.chat_repl import ChatRepl
from gpt.infer.sample import sample
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.typed_config import REPO_ROOT

U = lambda text: {"role": "user", "content": text}
A = lambda text, task: {"role": "assistant", "content": text, "task": task}
DIALOGS = [
    [U("What is 12 + 30?"), A("42", "math")],
    [U("Who are you?"), A("I am Quill.", "who")],
    [{"role": "system", "content": "You are Ada."}, U("Who are you?"), A("I am Ada.", "who")],
    [U("My name is Bob."), A("Hi Bob!", "hi"), U("What is my name?"), A("Bob.", "name")],
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_dialogs_module():
    spec = importlib.util.spec_from_file_location("make_dialogs", REPO_ROOT / "data" / "make_dialogs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(out, path, **sections) -> TrainRunConfig:
    d = {
        "out_dir": str(out), "seed": 3, "device": "cpu", "experiment": "sft",
        "model": dict(block_size=96, n_layer=2, n_head=2, n_embd=48, bias=False, norm="rmsnorm",
                      pos_emb="rope"),
        "data": dict(name="chat", format="dialogs", path=str(path), tokenizer="char", val_fraction=0.0),
        "optim": dict(lr=1e-2, warmup_steps=10, weight_decay=0.0),
        "train": dict(max_steps=150, batch_size=8, eval_interval=0, log_interval=50, ckpt_interval=0,
                      progress=False, peak_flops=1e12),
        "wandb": dict(mode="disabled"),
    }  # fmt: skip
    for key, value in sections.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    return TrainRunConfig.from_dict(d)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny chat model trained from scratch until it knows DIALOGS by heart."""
    tmp = tmp_path_factory.mktemp("chat")
    path = tmp / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGS))
    train(run_config(tmp / "run", path))
    return tmp / "run", path


def test_generator_holds_out_its_arithmetic_problems_and_answers_right():
    gen = make_dialogs_module()
    assert gen.worked(47, "+", 85) == "7+5=12, 4+8+1=13, so 132"
    assert gen.worked(52, "-", 18) == "12-8=4, 5-1-1=3, so 34"
    train_part, held_out = gen.generate(600, 0.1, seed=5)
    assert len(held_out) == 60 and len(train_part) == 540
    problems = {"train": set(), "val": set()}
    for split, dialogs in (("train", train_part), ("val", held_out)):
        for messages in dialogs:
            assert check_messages(messages) == []
            for user, reply in zip(messages, messages[1:], strict=False):
                if reply.get("task") == "arithmetic":
                    a, op, b = re.search(r"(\d+) ([+-]) (\d+)", user["content"]).groups()
                    result = int(reply["content"].rsplit("so ", 1)[1])  # the worked answer's last word
                    assert result == (int(a) + int(b) if op == "+" else int(a) - int(b))
                    problems[split].add((a, op, b))
    assert problems["val"] and not problems["val"] & problems["train"]
    tasks = {m["task"] for d in train_part for m in d if m["role"] == "assistant"}
    assert tasks == {"arithmetic", "recall", "greeting", "identity"}


def test_sft_from_a_pretrained_run_logs_held_out_val_loss(tmp_path, corpus, capsys):
    text = dict(
        format="text", tokenizer="bpe", vocab_size=320, cache_dir=str(tmp_path / "cache"), num_workers=1
    )
    base = run_config(tmp_path / "base", corpus, experiment="pretrain", model=dict(block_size=256), data=text,
                      train=dict(max_steps=2))  # fmt: skip
    train(base)
    gen = make_dialogs_module()
    path = tmp_path / "demo.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": m}) + "\n" for part in gen.generate(300, 0.1, 1) for m in part)
    )
    sft = run_config(tmp_path / "sft", path, init_from=str(tmp_path / "base"), model={"block_size": None},
                     data=dict(val_fraction=0.1), train=dict(max_steps=20, eval_interval=10, eval_steps=2),
                     optim=dict(lr=3e-3))  # fmt: skip
    sft.model = type(sft.model)()  # model=init: the shape comes from the base run
    train(sft)
    log = capsys.readouterr().err
    assert re.search(r"dialogs: 270 train, 30 val .*; 0 cut .* 0 left out .* padding \d+%", log), log
    records = read_metrics(sft.out_dir)
    assert [r["step"] for r in records] == [0, 10, 20]
    assert all(r["val_loss"] is not None for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5


def test_sft_step_loss_does_not_depend_on_the_micro_batch_split(chat_run, tmp_path):
    _, path = chat_run
    # fp32: the comparison is of the loss accounting, below bf16's rounding
    cfgs = [run_config(tmp_path / name, path, train=dict(max_steps=4, eval_interval=2, eval_steps=1,
                                                         dtype="fp32", **mbs))
            for name, mbs in (("one", {}), ("micro", {"micro_batch_size": 2}))]  # fmt: skip
    for cfg in cfgs:
        train(cfg)
    a, b = (read_metrics(cfg.out_dir) for cfg in cfgs)
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)


def test_evaluate_scores_exact_match_per_task_and_end_of_turn(chat_run, capsys):
    run, path = chat_run
    result = evaluate(EvalConfig(ckpt=str(run), data=str(path)))
    assert set(result["tasks"]) == {"math", "who", "hi", "name"}
    assert result["all"]["replies"] == 5
    assert result["all"]["exact_match"] == 1.0 and result["ended_with_eot"] == 1.0, result
    eval_main(["dialogs", f"ckpt={run}", f"data={path}", "limit=1"])
    out = capsys.readouterr().out
    assert re.search(r"math\s+1\s+100.0%", out) and "end-of-turn: 100.0%" in out
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["dialogs", f"ckpt={run}", "limits=1"])
    assert exit_info.value.code == 2 and "limits" in capsys.readouterr().err


def test_single_shot_chat_prints_just_the_reply(chat_run, capsys):
    run, _ = chat_run
    base = {"ckpt": str(run), "mode": "chat", "temperature": 0.0, "max_new_tokens": 20, "history_file": None}
    sample({**base, "prompt": "Who are you?"})
    assert capsys.readouterr().out == "I am Quill.\n"
    sample({**base, "prompt": "Who are you?", "system": "You are Ada."})
    assert capsys.readouterr().out == "I am Ada.\n"


class RecordingChat(ChatRepl):
    """The chat REPL, also keeping every prompt it rendered."""

    def prompt_ids(self, text):
        self.prompts = [*getattr(self, "prompts", []), super().prompt_ids(text)]
        return self.prompts[-1]


def chat_session(run, lines, **kw):
    import io

    loaded = load(run)
    model, tok = loaded.build(), loaded.tokenizer
    from gpt.infer.config import GenerationConfig

    settings = GenerationConfig(temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", 12))
    script = iter(lines)
    out, err = io.StringIO(), io.StringIO()
    repl = RecordingChat(model, tok, settings, input_fn=lambda _: next(script), out=out, err=err, **kw)
    with pytest.raises(StopIteration):
        repl.run()
    return repl, tok, out.getvalue(), err.getvalue()


def test_chat_repl_renders_as_training_keeps_history_and_saves(chat_run, tmp_path):
    run, _ = chat_run
    saved = tmp_path / "talk.jsonl"
    lines = ["My name is Bob.", "What is my name?", f"/save {saved}", "/reset", "/system You are Ada.",
             "Who are you?", f"/save {tmp_path / 'talk.txt'}"]  # fmt: skip
    repl, tok, out, err = chat_session(run, lines)
    assert out.splitlines() == ["Assistant: Hi Bob!", "Assistant: Bob.", "Assistant: I am Ada."]
    # the prompts are the training rendering of the conversation, cut before each reply
    ids, _ = render_dialog(tok, DIALOGS[3])
    assert repl.prompts[0] == ids[: len(repl.prompts[0])] and repl.prompts[1] == ids[: len(repl.prompts[1])]
    assert repl.prompts[2] == render_prompt(tok, DIALOGS[2][:2])
    # /save writes dialogs that read back as training data
    first, _ = read_dialogs(saved)
    assert [(m["role"], m["content"]) for m in first[0].messages] == [
        (m["role"], m["content"]) for m in DIALOGS[3]
    ]
    second, _ = read_dialogs(tmp_path / "talk.txt.jsonl")  # always messages JSONL: the round trip is exact
    assert [m["content"] for m in second[0].messages] == ["You are Ada.", "Who are you?", "I am Ada."]


def test_chat_drops_the_oldest_turns_but_keeps_the_system_prompt(chat_run, tmp_path):
    run, _ = chat_run
    lines = ["My name is Bob."] + ["Who are you?"] * 4 + [f"/save {tmp_path / 'all.jsonl'}"]
    repl, tok, out, err = chat_session(run, lines, system="You are Ada.", max_new_tokens=8)
    assert re.search(r"dropped the [2468] oldest turns", err)  # whole exchanges, with room to spare
    for prompt in repl.prompts:
        assert len(prompt) <= 96 - 8
        assert tok.decode(prompt).startswith("<|endoftext|>System: You are Ada.")
    assert repl.history()[0] == {"role": "system", "content": "You are Ada."}
    saved, _ = read_dialogs(tmp_path / "all.jsonl")  # /save keeps the whole conversation
    assert len(saved[0].messages) == 11 and saved[0].messages[0]["content"] == "You are Ada."
    assert [m["content"] for m in saved[0].messages if m["role"] == "user"] == lines[:5]
