"""The OpenAI ``tools`` API on a live server, through the official ``openai`` client: a tiny char model
that learnt one calculator dialog calls the tool, the client answers with a ``tool`` message and the
reply goes on; tool_choice none / required / a named function; streamed tool-call deltas reassembled by
the library; every malformed tool request an OpenAI 400 body."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers_serve import live_server  # noqa: E402

from gpt.chat_template import dialog_text, render_dialog, render_prompt  # noqa: E402
from gpt.infer.config import ServeConfig  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from gpt.tokenizer import EOT_TURN, CharTokenizer, char_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Arithmetic.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
}
ASK = [{"role": "user", "content": "What is 12*34?"}]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'},
}
DIALOGS = [
    [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "408"},
        {"role": "assistant", "content": "It is 408."},
    ],
    [{"role": "user", "content": "Who is Romeo?"}, {"role": "assistant", "content": "A Montague."}],
]


@pytest.fixture(scope="module")
def tool_model():
    """A tiny char model trained for a moment on DIALOGS: greedy, it calls the calculator for ASK."""
    torch.manual_seed(0)
    tok = char_tokenizer([*map(dialog_text, DIALOGS), "\nSystem: User: Assistant: 0123456789"])
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=tok.vocab_size))
    rows = [render_dialog(tok, d)[0] for d in DIALOGS]  # each dialog whole: one batch, every step
    width = max(map(len, rows))
    x = torch.tensor([r + [tok.eot_id] * (width - len(r)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.fixture(scope="module")
def server(tool_model):
    with live_server(*tool_model, ServeConfig(max_batch=4, max_tokens=100), name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def ask(client, messages=ASK, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


def test_round_trip_the_model_calls_the_client_answers_the_reply_goes_on(client, tool_model):
    first = ask(client, tools=[CALC]).choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content is None
    (call,) = first.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"expression": "12*34"}
    history = [
        *ASK,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "408"},
    ]
    final = ask(client, history, tools=[CALC])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert "408" in final.choices[0].message.content  # the model read the result it was given
    prompt = render_prompt(tool_model[1], history)  # the server rendered the result into the prompt
    assert final.usage.prompt_tokens == len(prompt)
    assert tool_model[1].decode(prompt).endswith("<|tool_result|>408<|tool_result_end|>")


def test_tool_choice_forms(client):
    assert ask(client, tools=[CALC], tool_choice="auto").choices[0].finish_reason == "tool_calls"
    none = ask(client, tools=[CALC], tool_choice="none", max_tokens=30).choices[0]
    assert none.message.tool_calls is None and "<|tool_call|>" not in (none.message.content or "")
    chat = [{"role": "user", "content": "Who is Romeo?"}]
    assert ask(client, chat, tools=[CALC]).choices[0].finish_reason == "stop"  # auto: no call needed
    forced = ask(client, chat, tools=[CALC], tool_choice="required").choices[0]
    # forced to open a call it never learnt to make here: what it wrote comes back as text
    assert forced.finish_reason == "stop" and forced.message.content.startswith("<|tool_call|>")
    required = ask(client, tools=[CALC], tool_choice="required").choices[0]
    assert (
        required.finish_reason == "tool_calls"
        and required.message.tool_calls[0].function.name == "calculator"
    )
    named = ask(
        client, tools=[CALC, CLOCK], tool_choice={"type": "function", "function": {"name": "calculator"}}
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "calculator" and named.choices[0].finish_reason == "tool_calls"


def test_a_call_of_an_undeclared_function_comes_back_as_text(client):
    """The model calls "calculator" but the request declares only "clock": plain text, "stop"."""
    choice = ask(client, tools=[CLOCK]).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content.startswith('<|tool_call|>{"name": "calculator"')


def test_streamed_tool_call_deltas_reassemble(client):
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=[CALC], temperature=0) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {
        "expression": "12*34"
    }
    chunks = list(
        client.chat.completions.create(model="tiny", messages=ASK, tools=[CALC], temperature=0, stream=True)
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].id.startswith("call_") and deltas[0][0].type == "function"
    assert deltas[0][0].function.name == "calculator" and deltas[0][0].function.arguments == ""
    assert "".join(d[0].function.arguments for d in deltas[1:]) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Who is Romeo?"}],
            tools=[CALC],
            temperature=0,
            stream=True,
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in plain)
        == ask(client, [{"role": "user", "content": "Who is Romeo?"}], tools=[CALC])
        .choices[0]
        .message.content
    )


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": []}},
                }
            ]
        },
        "tools",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}},
                    },
                }
            ]
        },
        "tools",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}},
            ]
        },
        "tools",
    ),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [CALC], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tool_choice"),
    ({"tools": [CALC], "tool_choice": 3}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {
            "messages": [
                *ASK,
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_9", "content": "1"},
            ]
        },
        "messages",
    ),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "1"}]}, "messages"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [CALL]}]}, "messages"),  # no result yet
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "calculator", "arguments": "{"}}],
                },
                {"role": "tool", "tool_call_id": "c", "content": "1"},
            ]
        },
        "messages",
    ),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": "calculator"}]}, "messages"),
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_tool_requests_get_an_openai_400(server, extra, param):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 5} | extra
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert len(error["message"]) <= 300


def test_a_model_without_tool_tokens_refuses_tools_in_one_400():
    """A tokenizer saved before tool calls existed (no tool tokens, no Hermes template)."""
    chars = sorted(set("\nUser: Assistant: Who is Romeo?"))
    old = CharTokenizer(chars, {"<|endoftext|>": len(chars), EOT_TURN: len(chars) + 1})
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=64, vocab_size=len(chars) + 2))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Who is Romeo?"}], "max_tokens": 3}
    with live_server(model, old, name="tiny") as s:
        refused = httpx.post(s.url + "/v1/chat/completions", json=chat | {"tools": [CALC]}, timeout=30)
        calls = httpx.post(
            s.url + "/v1/chat/completions",
            json=chat
            | {
                "messages": [
                    {"role": "user", "content": "Who is Romeo?"},
                    {"role": "assistant", "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "1"},
                ]
            },
            timeout=30,
        )
        plain = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=30)
    assert refused.status_code == 400 and "cannot call tools" in refused.json()["error"]["message"]
    assert calls.status_code == 400 and "no tool-call tokens" in calls.json()["error"]["message"]
    assert plain.status_code == 200


def test_a_hermes_template_model_calls_tools_in_its_own_format(tmp_path):
    """An imported model whose Qwen2.5-style template writes <tool_call> blocks: the template is shown
    the tools, the reply is generated to the end of its turn and its Hermes block read as a call."""
    from helpers_hf import write_hermes_tokenizer

    from gpt.chat_template import render_turns
    from gpt.interop.hf_vocab import hf_tokenizer

    torch.manual_seed(0)
    tok = hf_tokenizer(write_hermes_tokenizer(tmp_path / "qwen"))
    dialog = [
        {**ASK[0], "content": "What is 12 * 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {**CALL, "function": {"name": "calculator", "arguments": '{"expression": "12*3"}'}}
            ],
        },
    ]
    row = render_turns(
        tok,
        [
            *dialog,
            {"role": "tool", "tool_call_id": "call_1", "content": "36"},
            {"role": "assistant", "content": "It is 36."},
        ],
        tools=[CALC],
    )[0]
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=512, vocab_size=tok.vocab_size))
    x = torch.tensor([row])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with live_server(model.eval(), tok, ServeConfig(max_tokens=100), name="tiny") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        reply = ask(c, dialog[:1], tools=[CALC]).choices[0]
        none = ask(c, dialog[:1], tools=[CALC], tool_choice="none", max_tokens=20).choices[0]
        with c.chat.completions.stream(
            model="tiny", messages=dialog[:1], tools=[CALC], temperature=0
        ) as stream:
            streamed = stream.get_final_completion().choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    assert json.loads(reply.message.tool_calls[0].function.arguments) == {"expression": "12*3"}
    assert (
        streamed.finish_reason == "tool_calls"
        and streamed.message.tool_calls[0].function.name == "calculator"
    )
    assert none.message.tool_calls is None  # the template was not shown the tools; nothing is parsed
