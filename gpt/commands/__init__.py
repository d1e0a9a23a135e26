"""The commands, one module each, and the ``gpt`` command that dispatches to them (``gpt VERB
--help`` shows the Hydra help of a verb with a conf file; ``python -m gpt VERB`` is the same):

    gpt train data=text data.path=notes/          # = python train.py ...
    gpt sample 'prompt=Hello, world'              # = python sample.py ...
    gpt chat ckpt=out/chat                        # = python sample.py mode=chat ...
    gpt prepare notes/ data.tokenizer=bpe         # tokenize a corpus ahead of training
    gpt check-dialogs dialogs.jsonl               # check a dialog file, show it rendered
    gpt eval bpb ckpt=out/run data.path=FILE      # also cloze, tasks, dialogs
    gpt lm-eval --model gpt --model_args ckpt=out/run --tasks T
    gpt plot out/a out/b x=tokens
    gpt export ckpt=out/finetune out=out/hf
    gpt merge ckpt=out/lora out=out/merged
    gpt bench models=[gpt2]
    gpt serve ckpt=out/chat port=8000

Every command reads its command line through ``gpt.commands.cli`` (the one convention) and calls
the library; nothing below this package imports it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from gpt.commands.cli import errors_as_exit

# verb -> (module, function taking argv, what it does); modules are imported only when used
VERBS = {
    "train": ("gpt.commands.train", "train_main", "pretrain, fine-tune or instruction-tune (train.py)"),
    "sample": ("gpt.commands.sample", "sample_main", "generate text, or a prompt loop (sample.py)"),
    "chat": ("gpt.commands.sample", "sample_main", "chat with a chat model (sample.py mode=chat)"),
    "prepare": ("gpt.commands.prepare", "run", "tokenize a corpus into cached shards"),
    "check-dialogs": ("gpt.commands.check_dialogs", "run", "check a dialog file, show it rendered"),
    "eval": ("gpt.commands.eval", "run", "bpb, cloze, task files, chat dialogs (gpt eval VERB)"),
    "lm-eval": ("gpt.eval.lm_eval", "cli", "lm-evaluation-harness on our model"),
    "plot": ("gpt.commands.plot", "run", "loss, bpb and task curves of runs as a PNG"),
    "export": ("gpt.commands.export", "export_main", "write a Hugging Face GPT-2 directory"),
    "merge": ("gpt.commands.export", "merge_main", "fold LoRA adapters into the weights"),
    "bench": ("gpt.commands.bench", "run", "training throughput benchmark"),
    "serve": ("gpt.commands.serve", "run", "OpenAI-compatible HTTP API and chat page"),
}


def usage() -> str:
    lines = ["usage: gpt VERB [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<14} {what}" for verb, (_, _, what) in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        with errors_as_exit():  # `gpt --help | head` ends quietly
            print(usage(), flush=True)
        return
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        sys.exit(2)
    module, function, _ = VERBS[verb]
    if verb == "chat":
        rest = ["mode=chat", *rest]
    sys.argv = [f"gpt {verb}", *rest]  # Hydra's own flags (--help, --cfg) read sys.argv
    getattr(importlib.import_module(module), function)(rest)

