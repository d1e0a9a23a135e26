"""The tools the engine runs inside a reply: ``Tool`` (a function and its JSON schema), the ``ToolBox``
registry, and the built-in ``calculator``.

A model asks for a tool with a call (``gpt.tool_calls``); the command that owns the conversation
runs it with ``ToolBox.run`` and forces the result into the reply. ``run`` never raises: an unknown
tool, arguments that do not fit the schema, a tool that raises or takes too long all come back as a
result string "error: ...", which the model reads like any other result.

    box = ToolBox([CALCULATOR])
    box.register(lambda city: "sunny", name="weather", description="Today's weather in a city.",
                 parameters={"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]})
    box.run(call)                                    # "56088", "error: unknown tool 'x' ..."

The calculator evaluates an expression parsed with ``ast`` (never ``eval``): numbers, + - * / // %
**, unary signs and parentheses. Every intermediate value is bounded (``MAX_RESULT_DIGITS``) and an
operation whose result would pass the bound is refused *before* it is computed, so 10**10**10
answers "error: ... too large" at once instead of filling memory.
"""

from __future__ import annotations

import ast
import math
import operator
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gpt.errors import ConfigError, DataError
from gpt.tokenizer import TOOL_TOKENS, Tokenizer
from gpt.tool_calls import ToolCall, call_body, parse_body

MAX_EXPRESSION_CHARS = 200
"""Longest expression the calculator reads."""
MAX_OPERAND_DIGITS = 30
"""Most digits of a number written in an expression."""
MAX_RESULT_DIGITS = 60
"""Most digits of any intermediate or final value (in magnitude, also for decimals: 1e60)."""
MAX_RESULT_CHARS = 2000
"""A tool's result is cut to this many characters: it is forced into the model's context."""
TOOL_TIMEOUT_S = 5.0
"""Seconds a tool may run before its call answers an error."""

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}  # fmt: skip


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does and its arguments as a JSON schema
    (an object's ``properties`` and ``required``, as OpenAI's ``tools`` give them); ``fn`` takes the
    arguments as keywords and returns the result (made a string)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry: {"type": "function", "function": {name, description, parameters}}."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def check_arguments(tool: Tool, arguments: Any) -> str | None:
    """The problem with ``arguments`` for ``tool`` (a missing or unknown key, a wrong JSON type);
    None when they fit. Only the top-level object is checked: a tool checks its own values."""
    if not isinstance(arguments, dict):
        return f"arguments of {tool.name} must be a JSON object, not {type(arguments).__name__}"
    properties = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    if missing:
        return f"{tool.name} needs the argument(s) {', '.join(missing)}"
    for key, value in arguments.items():
        if key not in properties:
            return f"{tool.name} has no argument {key!r} (it takes {', '.join(properties) or 'none'})"
        kind = properties[key].get("type") if isinstance(properties[key], dict) else None
        kinds = [kind] if isinstance(kind, str) else list(kind or [])
        wanted = tuple(t for k in kinds for t in JSON_TYPES.get(k, (object,)))
        bool_as_number = isinstance(value, bool) and "boolean" not in kinds
        if wanted and (not isinstance(value, wanted) or bool_as_number):
            return f"argument {key!r} of {tool.name} must be {' or '.join(kinds)}"
    return None


def _timed(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """(finished, result or the exception raised) of fn() run in a daemon thread for up to ``timeout``
    seconds; a thread cannot be killed, so one that overruns is left behind (it holds no lock of ours)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # every failure, SystemExit too, becomes the result
            box.append(e)

    thread = threading.Thread(target=target, daemon=True, name="gpt-tool")
    thread.start()
    thread.join(timeout)
    return (not thread.is_alive() and bool(box)), (box[0] if box else None)


class ToolBox:
    """The tools a conversation may call, by name; ``run(call)`` answers a call with a string."""

    def __init__(self, tools: Iterable[Tool] = (), timeout: float = TOOL_TIMEOUT_S):
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> Tool:
        """Register ``tool`` (ConfigError when its name is taken or its schema is not an object's)."""
        if not tool.name or tool.name in self.tools:
            raise ConfigError(f"tool {tool.name!r}: the name is empty or already registered")
        params = tool.parameters
        if not isinstance(params, dict) or params.get("type") != "object":
            raise ConfigError(f"tool {tool.name}: parameters must be a JSON schema with type 'object'")
        self.tools[tool.name] = tool
        return tool

    def register(self, fn: Callable[..., Any], *, parameters: dict[str, Any], name: str | None = None,
                 description: str | None = None) -> Tool:  # fmt: skip
        """Register a Python function under ``name`` (default: its own) with its JSON schema."""
        doc = (fn.__doc__ or "").strip().splitlines()
        return self.add(Tool(name or fn.__name__, description or (doc[0] if doc else ""), parameters, fn))

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __bool__(self) -> bool:
        return bool(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools as OpenAI's ``tools`` list."""
        return [tool.schema() for tool in self.tools.values()]

    def run(self, call: ToolCall) -> str:
        """The result of ``call`` (its name and arguments) as text, at most
        MAX_RESULT_CHARS; "error: ..." for an unknown tool, bad arguments, a raise or a timeout."""
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return f"error: unknown tool {call.name!r} (tools: {known})"
        problem = check_arguments(tool, call.arguments)
        if problem:
            return f"error: {problem}"
        finished, result = _timed(lambda: tool.fn(**call.arguments), self.timeout)
        if not finished:
            return f"error: {tool.name} took longer than {self.timeout:g} s"
        if isinstance(result, BaseException):
            return f"error: {tool.name} failed: {type(result).__name__}: {result}"[:MAX_RESULT_CHARS]
        text = result if isinstance(result, str) else str(result)
        return text if len(text) <= MAX_RESULT_CHARS else text[: MAX_RESULT_CHARS - 3] + "..."


class CalculatorError(ValueError):
    """What is wrong with an expression: the calculator answers it as "error: <message>"."""


BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip


def _digits(x: int | float) -> float:
    """Decimal digits of |x| before the point (an estimate from the binary size for ints: no str())."""
    if isinstance(x, int):
        return abs(x).bit_length() * math.log10(2)
    return math.log10(abs(x)) + 1 if x else 0.0


def _check(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large")
    if _digits(value) > MAX_RESULT_DIGITS + 1:
        raise CalculatorError(f"result too large (more than {MAX_RESULT_DIGITS} digits)")
    return value


def _power(a: int | float, b: int | float) -> int | float:
    """a ** b, refused when its size (b * digits(a)) passes the bound: checked before computing."""
    if abs(a) > 1 and b > 0 and b * math.log10(abs(a)) > MAX_RESULT_DIGITS:
        raise CalculatorError(f"result too large (more than {MAX_RESULT_DIGITS} digits)")
    if a == 0 and b < 0:
        raise CalculatorError("division by zero (0 to a negative power)")
    if abs(a) < 1 and a != 0 and b < 0 and -b * -math.log10(abs(a)) > MAX_RESULT_DIGITS:
        raise CalculatorError(f"result too large (more than {MAX_RESULT_DIGITS} digits)")
    result = a**b
    if isinstance(result, complex):
        raise CalculatorError("a negative number to a fractional power has no real result")
    return result


def _binary(op: ast.operator, a: int | float, b: int | float) -> int | float:
    if type(op) not in BINARY:
        raise CalculatorError(f"operator {type(op).__name__} is not arithmetic")
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
        raise CalculatorError("division by zero")
    if isinstance(op, ast.Mult) and _digits(a) + _digits(b) > MAX_RESULT_DIGITS + 2:
        raise CalculatorError(f"result too large (more than {MAX_RESULT_DIGITS} digits)")
    if isinstance(op, ast.Pow):
        return _power(a, b)
    if isinstance(op, ast.Div) and isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b  # exact: stays an int (6/3 is 2, not 2.0)
    return BINARY[type(op)](a, b)


def _evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic AST node; CalculatorError for anything else (names, calls, ...)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if _digits(node.value) > MAX_OPERAND_DIGITS or not math.isfinite(node.value):
            raise CalculatorError(f"number too large (more than {MAX_OPERAND_DIGITS} digits)")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        try:
            return _check(_binary(node.op, left, right))
        except (OverflowError, ZeroDivisionError) as e:
            raise CalculatorError("result too large" if isinstance(e, OverflowError) else str(e)) from None
    raise CalculatorError(f"not arithmetic: {type(node).__name__} (numbers, + - * / // % ** and parentheses)")


def format_number(value: int | float) -> str:
    """An int as itself; a float rounded to 12 significant digits ("0.3", not 0.30000000000000004),
    written as an int when it is one (2.5 * 2 -> "5")."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression; the result as text, or "error: ..." (never raises)."""
    if not isinstance(expression, str):
        return "error: the expression must be a string"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: expression too long (more than {MAX_EXPRESSION_CHARS} characters)"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return f"error: not an arithmetic expression: {expression!r}"
    try:
        return format_number(_evaluate(tree))
    except CalculatorError as e:
        return f"error: {e}"
    except RecursionError:
        return "error: expression nested too deeply"


CALCULATOR = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 123*456 or (17+5)/4"}},
        "required": ["expression"],
    },
    fn=calculate,
)
BUILTIN_TOOLS: dict[str, Tool] = {CALCULATOR.name: CALCULATOR}
"""The tools gpt ships, by name (the ``tools`` setting picks among them)."""


def toolbox(names: Iterable[str]) -> ToolBox:
    """A ToolBox of the built-in tools named (ConfigError naming an unknown one)."""
    names = list(names)
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown:
        raise ConfigError(f"tools={names}: unknown tool {unknown[0]!r}; built-in: {', '.join(BUILTIN_TOOLS)}")
    return ToolBox(BUILTIN_TOOLS[n] for n in names)


def encode_result(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a tool's result; characters a char-level vocabulary lacks are left out (a result
    is the tool's text, not the user's: it must never fail the reply)."""
    try:
        return tokenizer.encode(text)
    except DataError:
        kept = []
        for c in text:
            try:
                kept += tokenizer.encode(c)
            except DataError:
                continue
        return kept


class ToolRunner:
    """Runs the calls of a reply while it is decoded (``gpt.infer.sampling.Row``): when a row's last
    token is <|tool_call_end|>, the body since its <|tool_call|> is parsed and run by the toolbox, and
    <|tool_result|>RESULT<|tool_result_end|> is what the row must take next (forced tokens, one per
    decode step, in the same KV cache). A malformed call gets an "error: ..." result too."""

    def __init__(self, tokenizer: Tokenizer, box: ToolBox,
                 on_call: Callable[[ToolCall | str, str], None] | None = None):  # fmt: skip
        self.tokenizer, self.box, self.on_call = tokenizer, box, on_call
        self.call, self.call_end, self.result, self.result_end = map(tokenizer.special_id, TOOL_TOKENS)

    def after(self, ids: list[int]) -> list[int]:
        """The ids to force after the generated ``ids`` (a reply so far): a result when the last one
        ends a call, else none."""
        if not ids or ids[-1] != self.call_end:
            return []
        start = next((i for i in range(len(ids) - 2, -1, -1) if ids[i] in (self.call, self.call_end)), None)
        if start is None or ids[start] != self.call:
            parsed: ToolCall | str = "<|tool_call_end|> without <|tool_call|>"
        else:
            parsed = parse_body(self.tokenizer.decode(ids[start + 1 : -1]))
        result = self.box.run(parsed) if isinstance(parsed, ToolCall) else f"error: {parsed}"
        if self.on_call is not None:
            self.on_call(parsed, result)
        return [self.result, *encode_result(self.tokenizer, result), self.result_end]


def reply_messages(tokenizer: Tokenizer, ids: list[int]) -> list[dict[str, Any]]:
    """A reply in our tokens, calls and their forced results included, as OpenAI messages: for each
    call an assistant message (the text before it, ``tool_calls``) and a tool message (its result),
    then the final assistant message (the text after the last result). A malformed call, or one left
    without a result, stays in the text, so the messages always render as a valid dialog."""
    call, call_end, result, result_end = (tokenizer.special_id(t) for t in TOOL_TOKENS)
    messages: list[dict[str, Any]] = []
    text: list[int] = []
    pending: list[tuple[list[int], ToolCall]] = []  # (the text before it, the call) awaiting a result
    i = 0
    while i < len(ids):
        if ids[i] not in (call, result):
            text.append(ids[i])
            i += 1
            continue
        end = call_end if ids[i] == call else result_end
        j = next((j for j in range(i + 1, len(ids)) if ids[j] == end), len(ids))
        body = tokenizer.decode(ids[i + 1 : j])
        parsed = parse_body(body, f"call_{len(messages) // 2 + len(pending) + 1}") if ids[i] == call else None
        if isinstance(parsed, ToolCall) and j < len(ids):
            pending.append((text, parsed))
            text = []
        elif ids[i] == result and pending and j < len(ids):
            before, c = pending.pop(0)
            content = tokenizer.decode(before).strip() or None
            messages += [{"role": "assistant", "content": content, "tool_calls": [c.to_openai()]},
                         {"role": "tool", "tool_call_id": c.id, "content": body}]  # fmt: skip
        else:
            text += ids[i : j + 1]
        i = j + 1
    for before, c in reversed(pending):  # calls the reply ended on: their text is all that is kept
        text = before + tokenizer.encode(call_body(c.name, c.arguments)) + text
    messages.append({"role": "assistant", "content": tokenizer.decode(text).strip()})
    return messages
