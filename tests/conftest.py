"""Shared fixtures: a small corpus and a factory for tiny, fast training configs."""

import os
from pathlib import Path

import pytest
import torch

from gpt.config import TrainRunConfig
from gpt.typed_config import REPO_ROOT

os.environ.setdefault("WANDB_MODE", "disabled")
SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 60 kB of Tiny Shakespeare (cut at a line end)."""
    text = SHAKESPEARE.read_text()[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_small.txt"
    path.write_text(text[: text.rfind("\n") + 1])
    return path


@pytest.fixture
def make_cfg(tmp_path, corpus):
    """make_cfg(**overrides) -> TrainRunConfig for a tiny char-level run in tmp_path."""

    def make(out: str = "run", **sections) -> TrainRunConfig:
        d = {
            "out_dir": str(tmp_path / out),
            "seed": 7,
            "device": "cpu",
            "model": dict(
                block_size=32,
                n_layer=2,
                n_head=2,
                n_embd=32,
                dropout=0.0,
                bias=False,
                norm="rmsnorm",
                pos_emb="rope",
            ),
            "data": dict(
                name="small",
                path=str(corpus),
                tokenizer="char",
                cache_dir=str(tmp_path / "cache"),
                num_workers=1,
            ),
            "optim": dict(lr=3e-3, warmup_steps=5, weight_decay=0.1),  # the tests' settings since they began
            "train": dict(
                max_steps=30,
                batch_size=8,
                eval_interval=10,
                eval_steps=2,
                log_interval=10,
                ckpt_interval=0,
                progress=False,
                peak_flops=1e12,
                dtype="fp32",  # the same math on every machine (auto is bf16 on CPUs with AVX512-BF16)
            ),
            "wandb": dict(mode="disabled"),
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                d[key] = {**d.get(key, {}), **value}
            else:
                d[key] = value
        return TrainRunConfig.from_dict(d)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU cannot stall a thread team."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory, one_thread):
    """A tiny chat-trained char run (helpers_serve.tiny_run), one per server test module."""
    from helpers_serve import tiny_run

    return tiny_run(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def served(serve_run):
    """That run loaded as ``gpt serve`` loads it (fp32, CPU): the model and tokenizer a live server takes."""
    pytest.importorskip("fastapi")
    from gpt.infer.config import ServeConfig
    from gpt.serve.server import load_for_serving

    return load_for_serving(ServeConfig(ckpt=str(serve_run), device="cpu", dtype="fp32"))
