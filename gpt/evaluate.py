"""Score a chat model on held-out dialogs: ``python -m gpt.evaluate ckpt=DIR [KEY=VALUE ...]`` (or
``gpt eval ...``). Keys: conf/evaluate.yaml; the scoring is gpt.eval.dialogs.

    python -m gpt.evaluate ckpt=out/chat                 # the held-out dialogs of the run's own data
    python -m gpt.evaluate ckpt=out/chat data=my_dialogs.jsonl limit=200 show=5 out=eval.json
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from gpt.atomic import atomic_write
from gpt.cli import Command, main
from gpt.config import from_dict
from gpt.eval.dialogs import EvalConfig, evaluate, report

COMMAND = Command(
    "evaluate",
    usage="python -m gpt.evaluate ckpt=RUN_DIR [data=FILE] [limit=N] [show=N] [out=FILE.json]",
    free_text=("ckpt", "data", "out"),
)


def scoring_job(
    config_type: type, score: Callable[[Any], dict[str, Any]], report_of: Callable[[dict[str, Any]], str]
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The job of a scoring command: typed config, score, print the report, and with ``out=FILE``
    write the result as JSON (shared by ``python -m gpt.evaluate`` and ``python -m gpt.eval``)."""

    def job(cfg: dict[str, Any]) -> dict[str, Any]:
        config = from_dict(config_type, cfg)
        result = score(config)
        print(report_of(result))
        if config.out:
            atomic_write(config.out, json.dumps(result, indent=1))
        return result

    return job


job = scoring_job(EvalConfig, evaluate, report)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return main(job, COMMAND, argv)


if __name__ == "__main__":
    run()
