"""Load a model for serving and run the HTTP server until SIGTERM or Ctrl-C.

    from gpt.serve.server import load_for_serving, serve
    served = load_for_serving(ServeConfig(ckpt="out/chat"))   # model, tokenizer, name, chat-trained?
    serve(ServeConfig(ckpt="out/chat", port=8000))            # blocks; SIGTERM: finish, exit 0

A run, a checkpoint file, a LoRA run (the adapters are folded into the weights: the same outputs,
faster) or ``hf:DIR`` (a Hugging Face GPT-2 directory) can be served.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from gpt.device import pick_device, resolve_dtype
from gpt.errors import ConfigError
from gpt.infer.config import ServeConfig
from gpt.infer.engine import compile_decode
from gpt.model import GPT
from gpt.runs.load import load
from gpt.serve.app import create_app

log = logging.getLogger("gpt.serve")


@dataclass
class Served:
    model: GPT
    tokenizer: Any
    name: str
    chat_trained: bool


def load_for_serving(cfg: ServeConfig) -> Served:
    """The model ``cfg.ckpt`` names (LoRA adapters merged), on the device and in the dtype asked for."""
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    loaded = load(cfg.ckpt, merge=True)
    model = loaded.build(quantize=cfg.quantize).to(device=device, dtype=dtype).eval()
    if cfg.compile and cfg.draft is None:  # with drafts: the draft model's steps (gpt.serve.app)
        compile_decode(model)
    chat_trained = ((loaded.state.get("config") or {}).get("data") or {}).get("format") == "dialogs"
    return Served(model, loaded.tokenizer, cfg.model_name or loaded.name, chat_trained)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket on (host, port), as uvicorn binds it; ConfigError if the port is taken
    (one line, before anything claims the server is up)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port={port}: another program already listens on {host}:{port}; stop it "
                              "or choose another port= (port=0 picks a free one)") from None  # fmt: skip
        raise ConfigError(f"host={host} port={port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig) -> None:
    """Load the model and answer until SIGTERM/Ctrl-C, which let in-flight requests finish for up to
    ``shutdown_timeout`` seconds; then exit 0."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(cfg.host, cfg.port)  # first: a taken port fails before the model loads
    served = load_for_serving(cfg)
    model, weight = served.model, served.model.lm_head.weight
    print(f"serving {cfg.ckpt} as '{served.name}': {model.num_params() / 1e6:.2f}M parameters, context "
          f"{model.config.block_size}, device {weight.device}, {str(weight.dtype).removeprefix('torch.')}, "
          f"batch {cfg.max_batch}", file=sys.stderr)  # fmt: skip
    if not served.chat_trained:
        log.warning("%s has no chat training: /v1/chat/completions works, but replies may not follow the "
                    "conversation", served.name)  # fmt: skip
    if not is_loopback(cfg.host):
        log.warning("binding %s: the server is reachable from other machines%s", cfg.host,
                    "" if cfg.api_key else " and has no api_key")  # fmt: skip
    app = create_app(model, served.tokenizer, cfg, served.name, served.chat_trained)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=cfg.shutdown_timeout,
                            access_log=cfg.log_level == "debug")  # fmt: skip
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{sock.getsockname()[1]}"  # port=0: the port the system chose
    print(f"open {url}/ for the chat page; OpenAI API at {url}/v1", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again to its previous
    # handler: a no-op one lets the process end normally, with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("server stopped", file=sys.stderr)
