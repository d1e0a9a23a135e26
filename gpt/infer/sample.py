"""``sample.py``'s job: load a model, then print samples, or run the prompt loop or the chat loop.

python sample.py prompt="ROMEO:" num_samples=3      # samples on stdout, notices on stderr
python sample.py mode=interactive                   # gpt.infer.repl
python sample.py mode=chat ckpt=out/chat            # gpt.infer.chat_repl
"""

from __future__ import annotations

import sys
from typing import Any, BinaryIO, TextIO

from gpt.device import pick_device, resolve_dtype
from gpt.errors import DataError
from gpt.infer.chat_repl import ChatRepl
from gpt.infer.config import SampleConfig
from gpt.infer.engine import compile_decode
from gpt.infer.generate import Generation
from gpt.infer.repl import Repl, print_samples, settings_line
from gpt.infer.speculative import ModelDrafter, drafter_from
from gpt.infer.tools import toolbox
from gpt.runs.load import load
from gpt.typed_config import resolve_path


def read_prompt(cfg: SampleConfig, stdin: BinaryIO | None = None) -> str:
    """The prompt, verbatim: ``prompt=`` as typed, or the text of ``prompt_file``: a file, a pipe or
    a device (``/dev/stdin``, a FIFO, ``/dev/null``), or ``-`` for standard input."""
    if cfg.prompt_file is None:
        return cfg.prompt
    name = cfg.prompt_file
    try:
        if name == "-":
            data = (stdin or sys.stdin.buffer).read()
        else:
            path = resolve_path(name)
            if path.is_dir():
                raise DataError(f"prompt_file={name} is a directory; give a UTF-8 text file (or - for stdin)")
            if not path.exists():
                raise DataError(f"prompt_file={name}: no such file; give a UTF-8 text file (or - for stdin)")
            data = path.read_bytes()  # also a FIFO or a character device: read to its end
    except OSError as e:
        raise DataError(f"prompt_file={name}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompt_file={name} is not UTF-8 text (byte {e.start})") from None


def sample(cfg_dict: dict[str, Any], out: TextIO | None = None, err: TextIO | None = None) -> None:
    """The job of ``sample.py``: load the checkpoint, then print samples or run the prompt loop."""
    out, err = out or sys.stdout, err or sys.stderr
    d = dict(cfg_dict)
    for key in ("prompt", "stop"):  # Hydra reads prompt=42 as a number; it is text
        if isinstance(d.get(key), (int, float)) and not isinstance(d[key], bool):
            d[key] = str(d[key])
    if d.get("prompt") is None:
        d["prompt"] = ""
    cfg = SampleConfig.from_dict(d)  # validates: out-of-range settings fail before any loading
    settings = cfg.generation()
    text = read_prompt(cfg)
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    loaded = load(cfg.ckpt)
    model, tokenizer = loaded.build(device, cfg.quantize), loaded.tokenizer
    model.to(dtype).eval()
    prompt_ids = tokenizer.encode(text)  # before any notice: a bad character is the only line
    drafter = None if cfg.draft is None else drafter_from(cfg.draft, cfg.draft_tokens, cfg.draft_ngram,
                                                          model, tokenizer)  # fmt: skip
    if cfg.compile and drafter is None:
        compile_decode(model)
    elif cfg.compile and isinstance(drafter, ModelDrafter):  # the model checks drafts eagerly: exact text
        compile_decode(drafter.model)
    # likewise a batch that cannot fit in memory (checked by Generation before it allocates)
    gen = None
    if cfg.mode == "generate":
        gen = Generation(model, tokenizer, prompt_ids, settings, drafter=drafter)
    print(f"sampling {cfg.ckpt}: {model.num_params() / 1e6:.2f}M parameters, context "
          f"{model.config.block_size}, device {device}, {str(dtype).removeprefix('torch.')}", file=err)
    print(f"settings: {settings_line(settings)}", file=err, flush=True)
    if cfg.mode == "interactive":
        Repl(model, tokenizer, settings, out=out, err=err, history_file=cfg.history_file,
             drafter=drafter).run()  # fmt: skip
        return
    if cfg.mode == "chat":
        chat = ChatRepl(model, tokenizer, settings, out=out, err=err, history_file=cfg.history_file,
                        system=cfg.system or None, drafter=drafter,
                        tools=toolbox(cfg.tools or []))  # fmt: skip
        chat.reply_once(text) if text else chat.run()
        return
    assert gen is not None
    if gen.dropped:
        total, block_size = len(gen.prompt_ids) + gen.dropped, model.config.block_size
        print(f"note: the prompt has {total} tokens, more than the model's context of {block_size}; "
              f"its first {gen.dropped} are left out", file=err)  # fmt: skip
    try:
        print_samples(gen, out, prefix=text if cfg.echo_prompt else "")
    except KeyboardInterrupt:
        out.write("\n")
        print("[stopped]", file=err)
        sys.exit(130)
