"""The dialog formats people have: ShareGPT, Alpaca and HH transcripts read to the same messages as
their OpenAI ``messages`` equivalents, the format detected per file and shown by ``gpt check-dialogs``."""

from __future__ import annotations

import json

import pytest

from gpt.commands.check_dialogs import run as chat_main
from gpt.data.dialogs import read_dialogs
from gpt.data.formats import hh_messages
from gpt.data.preference import read_pairs
from gpt.errors import DataError
from gpt.tokenizer import char_tokenizer

S = lambda text: {"role": "system", "content": text}
U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
DIALOGS = [
    [S("Be brief."), U("What is 2 + 2?"), A("4")],
    [U("My name is Bob."), A("Hi Bob!"), U("What is my name?"), A("Bob.")],
]


def write_jsonl(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_sharegpt_dialogs_read_as_their_messages_equivalent(tmp_path):
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    write_jsonl(tmp_path / "messages.jsonl", [{"messages": d} for d in DIALOGS])
    share = [{"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in d]} for d in DIALOGS]
    write_jsonl(tmp_path / "sharegpt.jsonl", share)
    plain, _ = read_dialogs(tmp_path / "messages.jsonl")
    share, _ = read_dialogs(tmp_path / "sharegpt.jsonl")
    assert [d.messages for d in share] == [d.messages for d in plain] == DIALOGS
    assert {d.format for d in share} == {"sharegpt"} and {d.format for d in plain} == {"messages"}


def test_alpaca_records_read_as_their_messages_equivalent(tmp_path):
    write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])  # fmt: skip
    dialogs, _ = read_dialogs(tmp_path / "alpaca.jsonl")
    assert [d.messages for d in dialogs] == [
        [U("Add the numbers.\n\n2 and 3"), A("5")],
        [U("Say hi."), A("Hi!")],
    ]
    assert dialogs[0].format == "alpaca"


def test_hh_transcripts_read_as_their_messages_equivalent(tmp_path):
    text = "\n\nHuman: My name is Bob.\n\nAssistant: Hi Bob!\n\nHuman: What is my name?\n\nAssistant: Bob."
    assert hh_messages(text) == DIALOGS[1]
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": text, "rejected": text.removesuffix("Bob.") + "Tom."}])
    (pair,), _ = read_pairs(tmp_path / "hh.jsonl")
    assert pair.prompt == DIALOGS[1][:-1] and (pair.chosen, pair.rejected) == ("Bob.", "Tom.")


def test_a_file_keeps_its_format_and_bad_records_are_named(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]},
        {"messages": DIALOGS[0]},  # another format inside a ShareGPT file
        {"conversations": [{"from": "gpt", "value": "Hello"}]},
    ])  # fmt: skip
    with pytest.raises(DataError) as e:
        read_dialogs(path)
    text = str(e.value)
    assert f"{path}:2: turn 2: unknown speaker 'robot'" in text
    assert f'{path}:3: missing "conversations"' in text
    assert f"{path}:4: message 1: turns must alternate" in text


def test_chat_command_shows_the_format_counts_and_marked_replies(tmp_path, capsys):
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}] * 3)
    (tmp_path / "talk.txt").write_text("User: Hi\nAssistant: Hello\n")
    chat_main([str(tmp_path)])
    out = capsys.readouterr().out
    assert f"format: alpaca ({tmp_path / 'alpaca.jsonl'}, 3 dialogs)" in out
    assert f"format: transcript ({tmp_path / 'talk.txt'}, 1 dialogs)" in out and "4 dialogs" in out
    char_tokenizer(["User: Say hi.\nAssistant: Hi!"]).save(tmp_path / "tok")
    chat_main([str(tmp_path / "alpaca.jsonl"), f"tokenizer={tmp_path / 'tok'}", "show=1"])
    out = capsys.readouterr().out
    assert "User: Say hi." in out and "Assistant:[ Hi!<|end_of_turn|>]" in out
