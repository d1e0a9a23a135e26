"""The ``gpt`` command: one verb per job, each taking the same ``key=value`` arguments as its
script or module (``gpt VERB --help`` shows the Hydra help where the verb has a conf file).

    gpt train data=text data.path=notes/          # = python train.py ...
    gpt sample 'prompt=Hello, world'              # = python sample.py ...
    gpt chat ckpt=out/chat                        # = python sample.py mode=chat ...
    gpt prepare notes/ data.tokenizer=bpe         # = python -m gpt.data ...
    gpt check-dialogs dialogs.jsonl               # = python -m gpt.chat ...
    gpt eval bpb ckpt=out/run data.path=FILE      # = python -m gpt.eval bpb ... (also cloze, tasks)
    gpt eval dialogs ckpt=out/chat                # = python -m gpt.evaluate ...
    gpt lm-eval --model gpt --model_args ckpt=out/run --tasks T   # = python -m gpt.eval.lm_eval ...
    gpt plot out/a out/b x=tokens                 # = python -m gpt.plot ...
    gpt export ckpt=out/finetune out=out/hf       # = python -m gpt.export ...
    gpt merge ckpt=out/lora out=out/merged        # = python -m gpt.lora merge ...
    gpt bench models=[gpt2]                       # = python -m gpt.bench ...
    gpt serve ckpt=out/chat port=8000             # = python -m gpt.serve ...
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from gpt.cli import errors_as_exit

# verb -> (module, function taking argv, what it does); modules are imported only when used
VERBS = {
    "train": ("gpt.commands", "train_main", "pretrain, fine-tune or instruction-tune (train.py)"),
    "sample": ("gpt.commands", "sample_main", "generate text, or a prompt loop (sample.py)"),
    "chat": ("gpt.commands", "sample_main", "chat with an instruction-tuned model (sample.py mode=chat)"),
    "prepare": ("gpt.data.__main__", "run", "tokenize a corpus into cached shards (python -m gpt.data)"),
    "check-dialogs": ("gpt.chat", "run", "check a dialog file, show it rendered (python -m gpt.chat)"),
    "eval": ("gpt.eval.__main__", "run", "bpb, cloze, task files, chat dialogs (python -m gpt.eval VERB)"),
    "lm-eval": ("gpt.eval.lm_eval", "cli", "lm-evaluation-harness on our model (python -m gpt.eval.lm_eval)"),
    "plot": ("gpt.plot", "run", "loss, bpb and task curves of runs as a PNG (python -m gpt.plot)"),
    "export": ("gpt.export", "export_main", "write a Hugging Face GPT-2 directory (python -m gpt.export)"),
    "merge": ("gpt.export", "merge_main", "fold LoRA adapters into the weights (python -m gpt.lora merge)"),
    "bench": ("gpt.bench", "run", "training throughput benchmark (python -m gpt.bench)"),
    "serve": ("gpt.serve.__main__", "run", "OpenAI-compatible HTTP API and chat page (python -m gpt.serve)"),
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
    if verb == "merge":
        rest = ["merge", *rest]
    sys.argv = [f"gpt {verb}", *rest]  # Hydra's own flags (--help, --cfg) read sys.argv
    getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    main()
