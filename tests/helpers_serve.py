"""Test helpers for the server: a tiny char-level run on disk and a live server on a free loopback port.

with live_server(model, tokenizer, ServeConfig(max_batch=8)) as server:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gpt.chat_template import render_dialog
from gpt.checkpoint import checkpoint_state, save_checkpoint
from gpt.infer.config import ServeConfig
from gpt.model import GPT, GPTConfig
from gpt.serve.app import create_app
from gpt.tokenizer import char_tokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me! é ü ß\n"


DIALOGS = [
    [{"role": "user", "content": "Who is Romeo?"}, {"role": "assistant", "content": "A Montague."}],
    [{"role": "user", "content": "Who is Juliet?"}, {"role": "assistant", "content": "A Capulet."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say ay."},
        {"role": "assistant", "content": "Ay me!"},
    ],
]


def tiny_run(directory: Path, block_size: int = 128, pos_emb: str = "rope", steps: int = 300) -> Path:
    """A run directory with a tiny char-level model trained for a moment on TEXT and DIALOGS (so that
    greedy text varies with the prompt and replies end their turn); a chat-trained run."""
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / "ckpt.pt", _trained(block_size, pos_emb, steps))
    return directory


@functools.lru_cache
def _trained(block_size: int, pos_emb: str, steps: int) -> dict:
    torch.manual_seed(0)
    tok = char_tokenizer([TEXT, "System: User: Assistant:", *(m["content"] for d in DIALOGS for m in d)])
    config = GPTConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=block_size,
        vocab_size=64,
        pos_emb=pos_emb,
        bias=pos_emb == "learned",
        norm="rmsnorm" if pos_emb == "rope" else "layernorm",
    )
    model = GPT(config)
    ids = [i for d in DIALOGS for i in render_dialog(tok, d)[0]] + tok.encode(TEXT)
    data = torch.tensor(ids * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        start = torch.randint(0, len(data) - 33, (16,))
        x = torch.stack([data[s : s + 32] for s in start])
        y = torch.stack([data[s + 1 : s + 33] for s in start])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run_config = {"data": {"format": "dialogs"}}
    return checkpoint_state(model.state_dict(), config, tok.to_state(), config=run_config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int):
        import uvicorn

        self.app, self.port, self.url = app, port, f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def live_server(
    model: GPT, tokenizer, cfg: ServeConfig | None = None, name: str = "tiny", chat_trained: bool = True
) -> Iterator[LiveServer]:
    app = create_app(model.eval(), tokenizer, cfg or ServeConfig(), name, chat_trained)
    server = LiveServer(app, free_port()).start()
    try:
        yield server
    finally:
        server.stop()
