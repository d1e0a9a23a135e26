"""``python -m gpt.eval VERB [key=value ...]`` (or ``gpt eval VERB ...``): score a model.

    python -m gpt.eval bpb ckpt=out/shakespeare_char data.path=data/tinyshakespeare/input.txt data.split=val
    python -m gpt.eval cloze ckpt=out/shakespeare_char data.path=data/tinyshakespeare/input.txt data.split=val
    python -m gpt.eval tasks ckpt=out/run tasks=[my_tasks/capitals] num_fewshot=3 out=results.json
    python -m gpt.eval dialogs ckpt=out/chat                # = python -m gpt.evaluate (chat dialogs)

Each verb reads its own file of conf/ (eval_bpb.yaml, eval_cloze.yaml, eval_tasks.yaml,
evaluate.yaml), prints a summary and, with ``out=FILE``, writes the result as JSON.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from gpt import evaluate as dialogs_command
from gpt.cli import Command, errors_as_exit, main
from gpt.errors import UserError
from gpt.eval import bpb, cloze, tasks
from gpt.evaluate import scoring_job

BPB = Command(
    "eval_bpb",
    usage="python -m gpt.eval bpb ckpt=RUN_DIR data.path=FILE [stride=N] [out=FILE.json]",
    free_text=("ckpt", "data.path", "out"),
)
CLOZE = Command(
    "eval_cloze",
    usage="python -m gpt.eval cloze ckpt=RUN_DIR data.path=FILE [n=N] [out=FILE.json]",
    free_text=("ckpt", "data.path", "out"),
)
TASKS = Command(
    "eval_tasks",
    usage="python -m gpt.eval tasks ckpt=RUN_DIR tasks=[DIR_OR_FILE,...] [out=FILE.json]",
    free_text=("ckpt", "out"),
)


VERBS: dict[str, tuple[Command, Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "bpb": (BPB, scoring_job(bpb.BpbConfig, bpb.evaluate_bpb, bpb.report), "bits per byte of a text"),
    "cloze": (CLOZE, scoring_job(cloze.ClozeConfig, cloze.evaluate_cloze, cloze.report),
              "4-way continuation choice built from any text (chance: 25%)"),
    "tasks": (TASKS, scoring_job(tasks.TasksConfig, tasks.evaluate_tasks, tasks.report),
              "multiple-choice and generative task files (JSONL)"),
}  # fmt: skip


def usage() -> str:
    lines = ["usage: python -m gpt.eval VERB [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<8} {what}" for verb, (_, _, what) in VERBS.items()]
    lines.append(f"  {'dialogs':<8} a chat model on held-out dialogs (python -m gpt.evaluate)")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    verb, rest = argv[0], argv[1:]
    if verb == "dialogs":
        return dialogs_command.run(rest)
    if "=" in verb:  # the former ``gpt eval ckpt=...`` scored dialogs: it still does
        return dialogs_command.run(argv)
    if verb not in VERBS:
        with errors_as_exit():
            raise UserError(f"unknown verb {verb!r}; verbs: {', '.join([*VERBS, 'dialogs'])}")
    command, job, _ = VERBS[verb]
    return main(job, command, rest)


if __name__ == "__main__":
    run()
