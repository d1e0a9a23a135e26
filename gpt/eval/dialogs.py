"""Score a chat model on held-out dialogs: greedy replies, exact match per task, end-of-turn rate.

    gpt eval dialogs ckpt=out/chat                 # the held-out dialogs of the run's own data
    gpt eval dialogs ckpt=out/chat data=my_dialogs.jsonl limit=200 show=5 out=eval.json

    from gpt.eval.dialogs import EvalConfig, evaluate, report
    print(report(evaluate(EvalConfig(ckpt="out/chat"))))

Every assistant turn of every dialog is one test: the model gets the reference history up to that
turn, rendered by ``gpt.chat_template.render_prompt`` exactly as in chat, and replies greedily until it emits
end-of-turn (or ``max_new_tokens``). A reply matches when it equals the reference content (outer
whitespace ignored). Results are grouped by the assistant message's ``"task"`` key ("untagged"
without one; ``data/make_dialogs.py`` sets it); turns that do not fit the model's context, as
training would cut them, are left out and counted. Prompts of equal length are decoded together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gpt.chat_template import render_prompt, render_turns
from gpt.data.dialogs import read_dialogs, split_dialogs
from gpt.device import pick_device
from gpt.errors import ConfigError
from gpt.infer.config import DEFAULT_TOOLS, SampleConfig
from gpt.infer.engine import compile_decode
from gpt.infer.generate import greedy_batch
from gpt.infer.tools import ToolRunner, reply_messages, toolbox
from gpt.quant import Quantize
from gpt.runs.load import load
from gpt.tokenizer import EOT_TURN


@dataclass
class EvalConfig:
    """``gpt eval dialogs``: a chat model's replies to held-out dialogs (``--help`` lists every key)."""

    ckpt: str = "out/chat"
    """The chat model: a run directory, a checkpoint file, a LoRA run or hf:DIR."""
    data: str | None = None
    """Dialog file, directory or glob to score, all of it; None = the run's held-out dialogs."""
    limit: int = 0
    """Score only the first this many dialogs; 0 = all."""
    max_new_tokens: int = 128
    """A reply longer than this counts as not ending with end-of-turn."""
    batch_size: int = 64
    """Replies decoded together."""
    show: int = 3
    """Print this many wrong replies per task."""
    out: str | None = None
    """Also write the results as JSON to this file."""
    device: str = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    quantize: Quantize = "none"
    """none | int8: decode the replies with int8 weights (gpt.quant), as sample.py's quantize."""
    compile: bool = SampleConfig.compile
    """torch.compile the decode step, as sample.py's compile (pays for many replies)."""
    tools: list[str] | None = field(default_factory=lambda: list(DEFAULT_TOOLS))
    """Built-in tools run inside a reply (gpt.infer.tools), as in chat: a reply that calls tools is
    one test, from its user turn to the final text after the results; none = the reference results
    are given (each reply part after a tool message is a test of its own)."""

    def __post_init__(self) -> None:
        for key in ("limit", "show"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        toolbox(self.tools or [])  # an unknown tool: one line before the model loads


def held_out_dialogs(state: dict[str, Any]) -> tuple[list, str]:
    """The held-out split of the dialogs a checkpoint was tuned on (the same as its val_loss's)."""
    data = state.get("config", {}).get("data", {})
    if data.get("format") != "dialogs":
        raise ConfigError("this checkpoint was not tuned on dialogs (data.format=dialogs); pass data=FILE")
    dialogs, _ = read_dialogs(data["path"], data.get("separator"), data.get("skip_invalid", False))
    return split_dialogs(dialogs, data.get("val_fraction", 0.1))[1], f"{data['path']} (held-out split)"


def turn_cases(tokenizer, dialogs, block_size: int, tools: bool = False) -> tuple[list[dict[str, Any]], int]:
    """One case per assistant turn that calls no tool: {prompt ids, reference, task}; plus the count
    of turns that do not fit in block_size + 1 tokens with their reference reply. With ``tools`` the
    prompt of a reply that called tools starts at its user turn (the engine runs the calls)."""
    cases, too_long = [], 0
    for d in dialogs:
        _, _, ends = render_turns(tokenizer, d.messages)
        start = 0  # where the current reply starts (after its user turn)
        for k, m in enumerate(d.messages):
            if m["role"] in ("user", "system"):
                start = k + 1
            if m["role"] != "assistant" or m.get("tool_calls"):
                continue
            if ends[k] > block_size + 1:
                too_long += 1
                continue
            history = d.messages[: start if tools else k]
            prompt, task = render_prompt(tokenizer, history), str(m.get("task", "untagged"))
            cases.append({"prompt": prompt, "reference": m["content"].strip(), "task": task})
    return cases, too_long


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score the model; returns {"tasks": {task: {"replies", "exact_match"}}, "all": ..., ...}."""
    loaded = load(cfg.ckpt)
    model = loaded.build(pick_device(cfg.device), cfg.quantize)
    tokenizer, state = loaded.tokenizer, loaded.state
    model.eval()
    if cfg.compile:
        compile_decode(model)
    if cfg.data is None:
        dialogs, source = held_out_dialogs(state)
    else:
        dialogs, source = read_dialogs(cfg.data)[0], cfg.data
    dialogs = dialogs[: cfg.limit] if cfg.limit else dialogs
    usable = tokenizer.has_tools and tokenizer.chat_template is None  # our call tokens: the engine runs them
    runner = ToolRunner(tokenizer, toolbox(cfg.tools)) if cfg.tools and usable else None
    cases, too_long = turn_cases(tokenizer, dialogs, model.config.block_size, runner is not None)
    t0 = time.time()
    prompts, eot_turn = [c["prompt"] for c in cases], tokenizer.special_id(EOT_TURN)
    completions = greedy_batch(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, (), [eot_turn],
                               tools=runner)  # fmt: skip
    # with tool tokens, the reply is its final text (after the last result; the calls are not shown)
    final = lambda c: reply_messages(tokenizer, c.ids)[-1]["content"] if usable else c.text.strip()
    replies = [(final(c), c.finish_reason == "stop") for c in completions]
    new = lambda: {"replies": 0, "exact": 0, "ended": 0, "wrong": []}
    tasks: dict[str, dict[str, Any]] = {}
    overall = new()
    for case, (reply, ended) in zip(cases, replies, strict=True):
        for t in (tasks.setdefault(case["task"], new()), overall):
            t["replies"] += 1
            t["exact"] += reply == case["reference"]
            t["ended"] += ended
            if reply != case["reference"] and t is not overall and len(t["wrong"]) < cfg.show:
                t["wrong"].append({"reference": case["reference"], "reply": reply})
    summary = lambda t: {"replies": t["replies"], "exact_match": t["exact"] / max(t["replies"], 1)}
    return {"ckpt": cfg.ckpt, "data": source, "dialogs": len(dialogs), "turns_too_long": too_long,
            "tasks": {name: {**summary(t), "wrong": t["wrong"]} for name, t in sorted(tasks.items())},
            "all": summary(overall), "ended_with_eot": overall["ended"] / max(overall["replies"], 1),
            "seconds": round(time.time() - t0, 1)}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['ckpt']} on {result['dialogs']} dialogs of {result['data']}"]
    if result["turns_too_long"]:
        lines.append(f"({result['turns_too_long']} turns left out: longer than the model's context)")
    lines.append(f"{'task':<12} {'replies':>8} {'exact match':>12}")
    for name, t in [*result["tasks"].items(), ("all", result["all"])]:
        lines.append(f"{name:<12} {t['replies']:>8} {100 * t['exact_match']:>11.1f}%")
    lines.append(f"replies ending with end-of-turn: {100 * result['ended_with_eot']:.1f}% "
                 f"({result['seconds']:.0f} s)")  # fmt: skip
    for name, t in result["tasks"].items():
        for w in t["wrong"]:
            lines.append(f"  wrong ({name}): expected {w['reference']!r}, got {w['reply']!r}")
    return "\n".join(lines)
