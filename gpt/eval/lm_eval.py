"""Our checkpoints as an EleutherAI lm-evaluation-harness model named ``gpt`` (``pip install
'gpt[eval]'``): ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``, batched, on the
scorer and decoder the built-in tasks use (``gpt.eval.scoring``, ``gpt.eval.tasks``).

    python -m gpt.eval.lm_eval --model gpt --model_args ckpt=out/run --tasks hellaswag --batch_size 16
    python -m gpt.eval.lm_eval --model gpt --model_args ckpt=out/run --device cpu \\
        --include_path my_tasks/ --tasks my_task --output_path results/      # a local task YAML
    gpt lm-eval --model gpt --model_args ckpt=out/run --tasks my_task --include_path my_tasks/

    import lm_eval, gpt.eval.lm_eval                                          # registers "gpt"
    lm_eval.simple_evaluate(model="gpt", model_args="ckpt=out/run", tasks=["my_task"])

``python -m gpt.eval.lm_eval`` is the harness's own command line (every flag of ``lm_eval``) with
``gpt`` registered: lm-eval 0.4 finds models in its own registry only, so the plain ``lm_eval``
command cannot see a model class from another package. A local task reads JSONL with
``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: FILE}}``; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import defaultdict
from typing import Any

import torch

from gpt.device import autocast_for, pick_device, resolve_dtype
from gpt.errors import ConfigError, UserError
from gpt.eval.scoring import continuation_logprobs, encode_pair, rolling_logprobs
from gpt.infer.generate import greedy_batch
from gpt.runs.load import load
from gpt.typed_config import Dtype, check_ranges, from_dict

try:  # the optional extra [eval]
    import lm_eval.models  # noqa: F401 -- loads lm-eval's own models, so that ours registers beside them
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    LM, register_model = object, None

MISSING = "lm-evaluation-harness is not installed; pip install 'gpt[eval]' (or pip install lm-eval)"


@dataclasses.dataclass
class LMEvalArgs:
    """What ``--model_args`` may say (and what lm-eval adds: batch_size, max_batch_size, device)."""

    ckpt: str = ""
    """a run directory, a checkpoint file or hf:DIR (gpt.runs.load); mandatory"""
    batch_size: int | str = 16
    """sequences scored together; lm-eval's "auto" (and "auto:N") means our default, 16"""
    max_batch_size: int | None = None
    """lm-eval's, for its "auto" batch size; not used"""
    device: str | None = "auto"
    """auto, cpu, cuda, cuda:N, mps (the index is lm-eval's habit and is ignored)"""
    dtype: Dtype = "auto"
    """the compute dtype"""
    stride: int | None = None
    """loglikelihood_rolling's window step (None: the scorer's default)"""
    max_gen_toks: int = 256
    """generate_until's limit when a task gives none"""

    def __post_init__(self) -> None:
        if not self.ckpt:
            raise ConfigError("--model_args needs ckpt=RUN (a run directory, a checkpoint file or hf:DIR)")
        auto = str(self.batch_size).startswith("auto")  # lm-eval's auto and auto:N: our default
        if isinstance(self.batch_size, str) and not (self.batch_size.isdigit() or auto):
            raise ConfigError(f"batch_size={self.batch_size!r} must be a positive integer or auto")
        check_ranges("model_args.", self, [
            ("batch_size", auto or int(self.batch_size) > 0, "a positive integer"),
            ("stride", self.stride is None or self.stride > 0, "a positive integer"),
            ("max_gen_toks", self.max_gen_toks > 0, "a positive integer"),
        ])  # fmt: skip


class GPTLM(LM):  # type: ignore[misc, valid-type]
    """lm-eval's model interface over a run directory or checkpoint (``ckpt=``); ``model_args`` are
    the fields of ``LMEvalArgs``, checked there (an unknown key or a bad value is one ConfigError)."""

    def __init__(self, **model_args: Any) -> None:
        if register_model is None:
            raise ConfigError(MISSING)
        super().__init__()
        args = from_dict(LMEvalArgs, model_args, prefix="model_args.")
        self._device = pick_device((args.device or "auto").split(":")[0])  # lm-eval says cuda:0
        loaded = load(args.ckpt)
        self.model, self.tokenizer = loaded.build(self._device), loaded.tokenizer
        self.model.eval()
        self.autocast = autocast_for(self._device, resolve_dtype(args.dtype, self._device))
        self.batch_size = 16 if str(args.batch_size).startswith("auto") else int(args.batch_size)
        self.stride = args.stride
        self.max_gen_toks = args.max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"gpt-{self.tokenizer.kind}-{self.tokenizer.fingerprint()[:12]}"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        with self.autocast:
            return continuation_logprobs(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        with self.autocast:
            for req in requests:
                ids = [self.tokenizer.eot_id, *self.tokenizer.encode(req.args[0])]
                out.append(float(rolling_logprobs(self.model, ids, self.stride, self.batch_size).sum()))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions; requests with the same settings are decoded together."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            groups[key].append(i)
        out = [""] * len(requests)
        with self.autocast:
            for (until, max_toks), idx in groups.items():
                prompts = [self.tokenizer.encode(requests[i].args[0]) or [self.tokenizer.eot_id] for i in idx]
                done = greedy_batch(self.model, self.tokenizer, prompts, max_toks, self.batch_size,
                                    until, [self.tokenizer.eot_id])  # fmt: skip
                for i, completion in zip(idx, done):
                    out[i] = completion.text
        return out


if register_model is not None:
    register_model("gpt")(GPTLM)


def _names_gpt(argv: list[str]) -> bool:
    """Whether the command line asks for our model (``--model gpt`` or ``--model=gpt``)."""
    pairs = zip(argv, [*argv[1:], ""])
    return any(a == "--model=gpt" or (a == "--model" and b == "gpt") for a, b in pairs)


def _check_model_args(argv: list[str]) -> None:
    """lm-eval passes its own --batch_size, --max_batch_size and --device beside ``--model_args``:
    the same key in both is a TypeError deep inside it, so it is named here."""
    for a, b in zip(argv, [*argv[1:], ""]):
        flag, eq, value = a.partition("=")
        if flag != "--model_args":
            continue
        text = value if eq else b
        keys = {part.split("=", 1)[0].strip() for part in text.split(",")}
        for key in sorted(keys & {"batch_size", "max_batch_size", "device"}):
            raise ConfigError(f"--model_args {key}=... is lm-eval's own flag: give it as --{key} instead")


def cli(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``gpt`` model registered. For ``--model gpt`` without
    ``--device`` the device is ``auto`` (lm-eval's default, cuda:0, fails on a machine without a GPU);
    our own mistakes (a bad ``--model_args``, a missing checkpoint, an absent device) are one
    ``error:`` line and exit status 2, as in every other command."""
    if register_model is None:
        print(f"error: {MISSING}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    given = any(a == "--device" or a.startswith("--device=") for a in argv)
    if _names_gpt(argv) and not given:
        argv += ["--device", "auto"]
    sys.argv = [sys.argv[0], *argv]
    try:
        if _names_gpt(argv):
            _check_model_args(argv)
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
