"""The engine's tools (gpt.infer.tools): the calculator's arithmetic and its bounds, and the ToolBox,
whose ``run`` answers every call with a string and never raises."""

from __future__ import annotations

import time

import pytest

from gpt.errors import ConfigError
from gpt.infer.tools import CALCULATOR, MAX_RESULT_CHARS, Tool, ToolBox, calculate, toolbox
from gpt.tool_calls import ToolCall


@pytest.mark.parametrize(
    "expression, expected",
    [("123*456", "56088"), ("1234 + 5678 + 910 + 4321", "12143"), ("6/3", "2"), ("1/3", "0.333333333333"),
     ("0.1+0.2", "0.3"), ("2.5*2", "5"), ("-(3+4)**2", "-49"), ("2**-2", "0.25"), ("17 // 5", "3"),
     ("17 % 5", "2"), (" ( 1 + 2 ) * 3 ", "9"), ("10**59", "1" + "0" * 59), ("999*999*999", "997002999")],
)  # fmt: skip
def test_calculator_arithmetic(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression, problem",
    [("10**10**10", "too large"), ("9**9**9", "too large"), ("2**200", "too large"),
     ("(10**30)*(10**30)*(10**30)", "too large"), ("9" * 40, "too large"), ("1e999", "too large"),
     ("0.5**-1000", "too large"), ("1/0", "division by zero"), ("5//0", "division by zero"),
     ("7 % 0", "division by zero"), ("0**-1", "division by zero"), ("1" * 201, "too long"),
     ("x + 1", "not arithmetic"), ("__import__('os').system('true')", "not arithmetic"),
     ("1 << 1000", "not arithmetic"), ("1 < 2", "not arithmetic"), ("'a' * 3", "not arithmetic"),
     ("(-8)**0.5", "no real result"), ("1 +", "not an arithmetic expression"), ("", "not an arithmetic"),
     ("(" * 150 + "1" + ")" * 150, "too long")],
)  # fmt: skip
def test_calculator_refuses_at_once(expression: str, problem: str) -> None:
    start = time.perf_counter()
    result = calculate(expression)
    assert result.startswith("error: ") and problem in result, result
    assert time.perf_counter() - start < 0.1  # refused before computing, never a hang


def test_calculator_deep_nesting_is_an_error_not_a_crash() -> None:
    assert calculate("-" * 199 + "1") == "-1"
    assert calculate("(" * 99 + "1" + ")" * 99) == "1"


def test_toolbox_runs_the_calculator() -> None:
    box = toolbox(["calculator"])
    assert box.run(ToolCall("calculator", {"expression": "123*456"})) == "56088"
    assert "calculator" in box and box.schemas() == [CALCULATOR.schema()]
    assert box.schemas()[0]["function"]["parameters"]["required"] == ["expression"]


@pytest.mark.parametrize(
    "call, problem",
    [(ToolCall("weather", {"city": "Oslo"}), "unknown tool 'weather' (tools: calculator)"),
     (ToolCall("calculator", {}), "needs the argument(s) expression"),
     (ToolCall("calculator", {"expression": "1", "x": 2}), "has no argument 'x'"),
     (ToolCall("calculator", {"expression": 12}), "'expression' of calculator must be string")],
)  # fmt: skip
def test_toolbox_bad_calls_are_error_results(call: ToolCall, problem: str) -> None:
    result = toolbox(["calculator"]).run(call)
    assert result.startswith("error: ") and problem in result, result


def test_register_a_python_function() -> None:
    def weather(city: str, days: int = 1) -> dict:
        """The weather in a city."""
        if city == "Atlantis":
            raise LookupError("no such city")
        return {"city": city, "days": days, "sky": "sunny"}

    box = ToolBox([CALCULATOR])
    params = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city"]}  # fmt: skip
    tool = box.register(weather, parameters=params)
    assert tool.name == "weather" and tool.description == "The weather in a city."
    assert box.run(ToolCall("weather", {"city": "Oslo", "days": 2})) == str(
        {"city": "Oslo", "days": 2, "sky": "sunny"}
    )
    assert box.run(ToolCall("weather", {"city": "Oslo", "days": True})).startswith("error: argument 'days'")
    assert box.run(ToolCall("weather", {"city": "Atlantis"})) == (
        "error: weather failed: LookupError: no such city"
    )
    with pytest.raises(ConfigError, match="already registered"):
        box.register(weather, parameters=params)
    with pytest.raises(ConfigError, match="type 'object'"):
        box.add(Tool("t", "", {"type": "string"}, str))


def test_a_slow_tool_is_cut_off_and_a_long_result_cut() -> None:
    box = ToolBox(timeout=0.2)
    box.register(lambda: time.sleep(5), name="slow", parameters={"type": "object"})
    box.register(lambda: "x" * 10**6, name="long", parameters={"type": "object"})
    start = time.perf_counter()
    assert box.run(ToolCall("slow", {})) == "error: slow took longer than 0.2 s"
    assert time.perf_counter() - start < 1
    long = box.run(ToolCall("long", {}))
    assert len(long) == MAX_RESULT_CHARS and long.endswith("...")


def test_unknown_builtin_is_one_line() -> None:
    """Refused by the configs themselves: before any model is loaded."""
    from gpt.eval.dialogs import EvalConfig
    from gpt.infer.config import SampleConfig

    with pytest.raises(ConfigError, match="unknown tool 'web'; built-in: calculator"):
        toolbox(["calculator", "web"])
    with pytest.raises(ConfigError, match="unknown tool 'web'"):
        SampleConfig.from_dict({"tools": ["web"], "ckpt": "/nonexistent"})
    with pytest.raises(ConfigError, match="unknown tool 'web'"):
        EvalConfig(ckpt="/nonexistent", tools=["web"])


# --- the engine runs the calls: a tiny model that learned one tool dialog --------------------------

DIALOG = [
    {"role": "user", "content": "What is 12*34?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "calculator", "arguments": "{\"expression\": \"12*34\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "408"},
    {"role": "assistant", "content": "12*34 = 408."},
]  # fmt: skip


@pytest.fixture(scope="module")
def caller():
    """(model, tokenizer): a 1-layer model overfitted on DIALOG, so that it writes the call itself."""
    import torch

    from gpt.chat_template import MARKERS, render_dialog
    from gpt.model import GPT, GPTConfig
    from gpt.tokenizer import char_tokenizer

    tok = char_tokenizer(['0123456789 *=.?{}":,abcdefghijklmnopqrstuvwxyzWAU\n', *MARKERS.values()])
    ids, mask = render_dialog(tok, DIALOG)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]])
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(120):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def box_777() -> ToolBox:
    """A calculator that answers 777: a result the model never saw, so it must have been forced."""
    box = ToolBox()
    box.register(lambda expression: "777", name="calculator", parameters=CALCULATOR.parameters)
    return box


def test_the_result_is_forced_into_the_same_cache_and_the_reply_goes_on(caller) -> None:
    from gpt.chat_template import render_prompt
    from gpt.infer.config import GenerationConfig
    from gpt.infer.engine import Decoder
    from gpt.infer.generate import Generation
    from gpt.infer.tools import ToolRunner, reply_messages
    from gpt.tokenizer import EOT_TURN, TOOL_RESULT, TOOL_RESULT_END

    model, tok = caller
    seen = []
    runner = ToolRunner(tok, box_777(), on_call=lambda call, result: seen.append((call.arguments, result)))
    prompt, decoder = render_prompt(tok, DIALOG[:1]), Decoder(model, 1)
    gen = Generation(model, tok, prompt, GenerationConfig(temperature=0, max_new_tokens=100),
                     stop_token_ids=[tok.special_id(EOT_TURN)], tools=runner, decoder=decoder)  # fmt: skip
    completion = gen.run()[0]
    assert seen == [({"expression": "12*34"}, "777")]
    forced = [tok.special_id(TOOL_RESULT), *tok.encode("777"), tok.special_id(TOOL_RESULT_END)]
    cached = decoder.context[0, : decoder.lengths[0]].tolist()
    assert cached[: len(prompt)] == prompt and any(
        cached[i : i + len(forced)] == forced for i in range(len(prompt), len(cached))
    )  # the result went through the model, in the reply's own cache
    assert completion.finish_reason == "stop" and completion.text.endswith("<|tool_result_end|> 12*34 = 408.")
    assert reply_messages(tok, completion.ids) == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "777"},
        {"role": "assistant", "content": "12*34 = 408."},
    ]  # fmt: skip
    no_tools = Generation(model, tok, prompt, GenerationConfig(temperature=0, max_new_tokens=100),
                          stop_token_ids=[tok.special_id(EOT_TURN)]).run()[0]  # fmt: skip
    assert "777" not in no_tools.text  # tools off: nothing runs


def test_chat_repl_runs_the_calculator_and_saves_tool_messages(caller, tmp_path) -> None:
    import io
    import json

    from gpt.infer.chat_repl import ChatRepl
    from gpt.infer.config import GenerationConfig

    model, tok = caller
    lines = iter(["What is 12*34?", f"/save {tmp_path / 'c'}", "/quit"])
    out, err = io.StringIO(), io.StringIO()
    settings = GenerationConfig(temperature=0, max_new_tokens=100)
    repl = ChatRepl(model, tok, settings, input_fn=lambda _: next(lines), out=out, err=err,
                    tools=toolbox(["calculator"]))  # fmt: skip
    repl.run()
    assert '{"expression": "12*34"}}<|tool_call_end|><|tool_result|>408<|tool_result_end|>' in out.getvalue()
    saved = json.loads((tmp_path / "c.jsonl").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant", "tool", "assistant"]
    assert saved[1]["tool_calls"][0]["function"]["name"] == "calculator" and saved[2]["content"] == "408"
    assert saved[3]["content"] == "12*34 = 408."
    assert repl.undo() == "What is 12*34?" and repl.messages == []


def test_eval_greedy_batch_runs_tools_and_scores_the_final_reply(caller) -> None:
    from gpt.data.dialogs import Dialog
    from gpt.eval.dialogs import turn_cases
    from gpt.infer.generate import greedy_batch
    from gpt.infer.tools import ToolRunner, reply_messages
    from gpt.tokenizer import EOT_TURN

    model, tok = caller
    dialogs = [Dialog(DIALOG, "test:1")]
    cases, _ = turn_cases(tok, dialogs, model.config.block_size, tools=True)
    assert len(cases) == 1 and cases[0]["reference"] == "12*34 = 408."
    runner = ToolRunner(tok, toolbox(["calculator"]))
    eot_turn = tok.special_id(EOT_TURN)
    done = greedy_batch(model, tok, [cases[0]["prompt"]] * 2, 100, 2, (), [eot_turn], tools=runner)
    assert [reply_messages(tok, c.ids)[-1]["content"] for c in done] == ["12*34 = 408."] * 2
    assert turn_cases(tok, dialogs, model.config.block_size)[0][0]["prompt"][-1] == tok.special_id(
        "<|tool_result_end|>"
    )  # tools off: the reference result is given


def test_make_dialogs_tools_and_direct_share_problems_and_hold_out(tmp_path) -> None:
    import importlib.util
    import json

    from gpt.typed_config import REPO_ROOT

    spec = importlib.util.spec_from_file_location("make_dialogs", REPO_ROOT / "data" / "make_dialogs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for flag in ("--tools", "--direct"):
        assert mod.main([flag, "--dialogs", "400", "--out", str(tmp_path / f"{flag[2:]}.jsonl")]) == 0
    read = lambda name: [json.loads(x)["messages"] for x in (tmp_path / name).read_text().splitlines()]
    tools, direct = read("tools.jsonl"), read("direct.jsonl")
    assert [d[-1]["content"] for d in tools] == [d[-1]["content"] for d in direct]
    for d in tools:
        expression = json.loads(d[-3]["tool_calls"][0]["function"]["arguments"])["expression"]
        assert d[-2]["content"] == calculate(expression)
        assert d[-1]["content"] == f"The answer is {d[-2]['content']}."
        assert expression in d[-4]["content"]  # copied verbatim from the question
    assert all(len(d) <= 3 and "tool_calls" not in d[-1] for d in direct)
    arguments = lambda d: json.loads(d[-3]["tool_calls"][0]["function"]["arguments"])
    problem = lambda d: arguments(d)["expression"].replace(" ", "")  # as asked, with or without spaces
    train, val = {problem(d) for d in tools[:360]}, {problem(d) for d in tools[360:]}
    assert len(val) == 40 and not train & val
