"""``gpt eval VERB [key=value ...]``: score a model (the scoring itself is gpt.eval).

    gpt eval bpb ckpt=out/shakespeare_char data.path=data/tinyshakespeare/input.txt data.split=val
    gpt eval cloze ckpt=out/shakespeare_char data.path=data/tinyshakespeare/input.txt data.split=val
    gpt eval tasks ckpt=out/run tasks=[my_tasks/capitals] num_fewshot=3 out=results.json
    gpt eval dialogs ckpt=out/chat data=my_dialogs.jsonl limit=200 show=5   # a chat model's replies

``ckpt=REF`` is any model reference: a run directory, a checkpoint file, a LoRA run or hf:DIR.
Each verb's keys are its config dataclass's (BpbConfig, ClozeConfig, TasksConfig, EvalConfig of
gpt.eval; ``gpt eval VERB --help`` lists them); it prints a summary and, with ``out=FILE``, writes
the result as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gpt.atomic import atomic_write
from gpt.commands.cli import Command, errors_as_exit, main
from gpt.errors import UserError
from gpt.eval import bpb, cloze, dialogs, tasks
from gpt.typed_config import from_dict

BPB = Command(
    "eval_bpb",
    schema=bpb.BpbConfig,
    usage="gpt eval bpb ckpt=REF data.path=FILE [stride=N] [out=FILE.json]",
    free_text=("ckpt", "data.path", "out"),
)
CLOZE = Command(
    "eval_cloze",
    schema=cloze.ClozeConfig,
    usage="gpt eval cloze ckpt=REF data.path=FILE [n=N] [out=FILE.json]",
    free_text=("ckpt", "data.path", "out"),
)
DIALOGS = Command(
    "eval_dialogs",
    schema=dialogs.EvalConfig,
    usage="gpt eval dialogs ckpt=REF [data=FILE] [limit=N] [show=N] [out=FILE.json]",
    free_text=("ckpt", "data", "out"),
)
TASKS = Command(
    "eval_tasks",
    schema=tasks.TasksConfig,
    usage="gpt eval tasks ckpt=REF tasks=[DIR_OR_FILE,...] [out=FILE.json]",
    free_text=("ckpt", "out"),
)


def scoring_job(
    config_type: type, score: Callable[[Any], dict[str, Any]], report_of: Callable[[dict[str, Any]], str]
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The job of a scoring verb: typed config, score, print the report, and with ``out=FILE``
    write the result as JSON."""

    def job(cfg: dict[str, Any]) -> dict[str, Any]:
        config = from_dict(config_type, cfg)
        result = score(config)
        print(report_of(result))
        if config.out:
            atomic_write(config.out, json.dumps(result, indent=1))
        return result

    return job


VERBS: dict[str, tuple[Command, Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "bpb": (BPB, scoring_job(bpb.BpbConfig, bpb.evaluate_bpb, bpb.report), "bits per byte of a text"),
    "cloze": (CLOZE, scoring_job(cloze.ClozeConfig, cloze.evaluate_cloze, cloze.report),
              "4-way continuation choice built from any text (chance: 25%)"),
    "tasks": (TASKS, scoring_job(tasks.TasksConfig, tasks.evaluate_tasks, tasks.report),
              "multiple-choice and generative task files (JSONL)"),
    "dialogs": (DIALOGS, scoring_job(dialogs.EvalConfig, dialogs.evaluate, dialogs.report),
                "a chat model's replies to held-out dialogs"),
}  # fmt: skip


def usage() -> str:
    lines = ["usage: gpt eval VERB [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<8} {what}" for verb, (_, _, what) in VERBS.items()]
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        with errors_as_exit():
            raise UserError(f"unknown verb {verb!r}; verbs: {', '.join(VERBS)}")
    command, job, _ = VERBS[verb]
    return main(job, command, rest)

