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

import sys
from collections import defaultdict
from typing import Any, get_args

import torch

from gpt.device import autocast_for, pick_device, resolve_dtype
from gpt.errors import ConfigError
from gpt.eval.scoring import continuation_logprobs, encode_pair, rolling_logprobs
from gpt.infer.generate import greedy_batch
from gpt.runs.load import load
from gpt.typed_config import Dtype

try:  # the optional extra [eval]
    import lm_eval.models  # noqa: F401 -- loads lm-eval's own models, so that ours registers beside them
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    LM, register_model = object, None

MISSING = "lm-evaluation-harness is not installed; pip install 'gpt[eval]' (or pip install lm-eval)"


class GPTLM(LM):  # type: ignore[misc, valid-type]
    """lm-eval's model interface over a run directory or checkpoint (``ckpt=``)."""

    # **_: lm-eval passes max_batch_size and others we have no use for
    def __init__(self, ckpt: str, batch_size: int | str = 16, device: str | None = "auto",
                 dtype: str = "auto", stride: int | None = None, max_gen_toks: int = 256, **_: Any) -> None:
        if register_model is None:
            raise ConfigError(MISSING)
        super().__init__()
        if dtype not in get_args(Dtype):  # lm-eval's model_args are plain strings: checked here
            raise ConfigError(f"dtype={dtype!r} must be one of {list(get_args(Dtype))}")
        self._device = pick_device((device or "auto").split(":")[0])  # lm-eval says cuda:0
        loaded = load(ckpt)
        self.model, self.tokenizer = loaded.build(self._device), loaded.tokenizer
        self.model.eval()
        self.autocast = autocast_for(self._device, resolve_dtype(dtype, self._device))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": our default
        self.stride = int(stride) if stride else None
        self.max_gen_toks = int(max_gen_toks)

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


def cli(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``gpt`` model registered."""
    if register_model is None:
        print(f"error: {MISSING}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    cli()
