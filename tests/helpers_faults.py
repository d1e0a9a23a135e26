"""Helpers of the fault tests (test_faults.py, test_faults_process.py): a NaN gradient on cue, metrics.jsonl
read strictly, and the checkpoints' weights."""

import json

import torch

from gpt.checkpoint import history, load_checkpoint


def poison(at_steps, times: int = 10**9):
    """An after_backward hook setting one gradient to NaN at the given steps, ``times`` times in all."""
    left = [times]

    def hook(step, model):
        if step in at_steps and left[0] > 0:
            left[0] -= 1
            next(model.parameters()).grad.fill_(float("nan"))

    return hook


def strict_lines(out_dir) -> list[dict]:
    """metrics.jsonl read by a strict JSON parser (bare NaN/Infinity rejected)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in open(f"{out_dir}/metrics.jsonl")]


def assert_finite_checkpoints(out_dir) -> None:
    files = history(out_dir)
    assert files
    for f in files:
        for k, t in load_checkpoint(f)["model"].items():
            assert torch.isfinite(t).all(), (f, k)


def weights(out_dir) -> dict:
    """The newest checkpoint's weights in ``out_dir``."""
    return load_checkpoint(out_dir)["model"]
