"""GRPO's reward functions, named in the config (``grpo.rewards``) and summed with their weights:

- ``exact``: 1.0 if the reply's final answer (its last word, trailing punctuation dropped) equals
  the prompt's ``answer``, else 0.0;
- ``regex:PATTERN``: 1.0 if ``re.search(PATTERN, reply)``, else 0.0 (a format check);
- ``module:function``: a Python function ``(messages, reply, record) -> float`` (``record``: the
  prompt's JSONL object), imported from the working directory or the installed packages.

    rewards = Rewards(cfg.grpo.rewards, cfg.grpo.reward_weights)
    r = rewards(prompt, reply_text)        # a float; a function that raises or returns a non-number
                                           # is a ConfigError naming the function and the prompt's file:line
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpt.errors import ConfigError

PUNCTUATION = ".,;:!?\"')"


def final_answer(reply: str) -> str:
    """The reply's last word without trailing punctuation: "7+5=12, so 132." -> "132"."""
    words = reply.split()
    return words[-1].rstrip(PUNCTUATION) if words else ""


def exact(messages: list[dict[str, Any]], reply: str, record: dict[str, Any]) -> float:
    return float(final_answer(reply) == str(record["answer"]).strip())


def _regex(spec: str) -> Callable[..., float]:
    try:
        pattern = re.compile(spec[len("regex:") :])
    except re.error as e:
        raise ConfigError(f"grpo.rewards: {spec!r} is not a valid regular expression ({e})") from None
    return lambda messages, reply, record: float(pattern.search(reply) is not None)


def _function(spec: str) -> Callable[..., float]:
    module_name, _, name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:  # a reward module beside the data, run from the project
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"grpo.rewards: cannot import {module_name!r} for {spec!r} ({type(e).__name__}: "
                          f"{e}); give module:function of an importable module") from None  # fmt: skip
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {module_name!r} has no function {name!r} ({spec!r})")
    return fn


def parse_reward(spec: str) -> Callable[..., float]:
    """The function a ``grpo.rewards`` entry names (see the module docstring)."""
    if spec == "exact":
        return exact
    if spec.startswith("regex:"):
        return _regex(spec)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return _function(spec)
    raise ConfigError(f"grpo.rewards: {spec!r} is not a reward; use exact, regex:PATTERN or module:function")


class Rewards:
    """The weighted sum of the configured reward functions."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] = ()) -> None:
        self.specs = list(specs)
        self.functions = [parse_reward(s) for s in specs]
        self.weights = list(weights) or [1.0] * len(self.functions)

    def __call__(self, prompt: Any, reply: str) -> float:
        """The reward of ``reply`` to ``prompt`` (a ``gpt.data.prompts.Prompt``)."""
        total = 0.0
        for spec, fn, w in zip(self.specs, self.functions, self.weights, strict=True):
            try:
                value = fn(prompt.messages, reply, prompt.record)
            except Exception as e:
                raise ConfigError(f"reward {spec!r} raised {type(e).__name__}: {e} on the prompt at "
                                  f"{prompt.source}; the last checkpoint is intact") from None  # fmt: skip
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"reward {spec!r} returned {value!r}, not a finite number, on the prompt "
                                  f"at {prompt.source}; the last checkpoint is intact")  # fmt: skip
            total += w * float(value)
        return total
