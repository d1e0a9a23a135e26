"""``gpt serve ckpt=DIR [host=...] [port=...] [KEY=VALUE ...]``:
serve a model over an OpenAI-compatible HTTP API with a chat page at ``/``. Keys:
gpt.infer.config.ServeConfig (``gpt serve --help``).

    gpt serve ckpt=out/chat                      # http://127.0.0.1:8000/
    gpt serve ckpt=hf:models/gpt2 port=8080 api_key=secret
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpt.commands.cli import Command, main
from gpt.infer.config import ServeConfig
from gpt.serve.server import serve

COMMAND = Command(
    "serve",
    schema=ServeConfig,
    usage="gpt serve ckpt=RUN_DIR|FILE|hf:DIR [host=127.0.0.1] [port=8000] (--help lists every key)",
    positional=("ckpt",),
    free_text=("ckpt", "host", "api_key", "model_name"),
)


def job(cfg: dict[str, Any]) -> None:
    d = {k: v for k, v in cfg.items() if k != "hydra"}
    serve(ServeConfig.from_dict(d))


def run(argv: Sequence[str] | None = None) -> None:
    main(job, COMMAND, argv)
