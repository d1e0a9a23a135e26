"""GRPO on tiny CPU runs: advantages and the clipped objective against hand-computed values, reward
specs and their refusals, prompt files, a reward function that fails, exact resume, and LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_eval import tiny_sft_run, write_jsonl

from gpt.checkpoint import CKPT_NAME
from gpt.config import TrainRunConfig
from gpt.data.prompts import read_prompts
from gpt.errors import ConfigError, DataError
from gpt.runs.metrics import read_metrics
from gpt.stage_config import GRPOConfig
from gpt.train.grpo import clipped_token_losses, group_advantages, k3
from gpt.train.loop import train
from gpt.train.rewards import Rewards, final_answer

pytestmark = pytest.mark.usefixtures("one_thread")

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
PROBLEMS = [(a, b) for a in range(1, 5) for b in range(1, 4)]


def bad_reward(messages, reply, record):
    raise ValueError("boom")


def nan_reward(messages, reply, record):
    return "high"


def test_advantages_are_normalised_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(r)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    a = 0.5 / (std + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a], rel=1e-5)
    assert adv[1].tolist() == [0.0] * 4  # a group that agrees teaches nothing


def test_the_clip_acts_once_the_ratio_leaves_its_band():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.1]]))  # ratios 1.5, 0.9, 1.1
    pos = clipped_token_losses(logp, old, torch.tensor([2.0]), clip_eps=0.2)
    assert pos.tolist()[0] == pytest.approx([-1.2 * 2, -0.9 * 2, -1.1 * 2])  # 1.5 clipped to 1.2
    neg = clipped_token_losses(logp, old, torch.tensor([-1.0]), clip_eps=0.2)
    assert neg.tolist()[0] == pytest.approx([1.5, 0.9, 1.1])  # min(): the unclipped, pessimistic side
    logp.requires_grad_(True)
    clipped_token_losses(logp, old, torch.tensor([2.0]), 0.2)[0, 0].backward()
    assert logp.grad[0, 0] == 0  # outside the band: no gradient
    ref = torch.log(torch.tensor([[1.0, 1.0, 1.0]]))
    d = ref - logp.detach()
    assert torch.allclose(k3(logp.detach(), ref), torch.exp(d) - d - 1)
    with_kl = clipped_token_losses(logp.detach(), old, torch.tensor([2.0]), 0.2, ref, kl_coef=0.5)
    assert torch.allclose(with_kl - pos, 0.5 * k3(logp.detach(), ref), atol=1e-6)


def test_reward_specs_and_their_refusals(tmp_path):
    p = read_prompts_of(tmp_path, [{"prompt": "What is 2 + 3?", "answer": 5}])[0]
    assert final_answer("2+3=5, so 5.") == "5"
    assert Rewards(["exact"])(p, "3+2=5, so 5") == 1.0
    assert Rewards(["exact", r"regex:^\d"], [2.0, 0.5])(p, "5") == 2.5
    assert Rewards(["exact", r"regex:^\d"])(p, "it is 6") == 0.0
    for spec, why in [("regex:(", "not a valid regular expression"), ("nope", "not a reward"),
                      ("no_such_module_xyz:f", "cannot import"), ("tests.test_grpo:missing", "no function")]:
        with pytest.raises(ConfigError, match=why):
            Rewards([spec])
    with pytest.raises(ConfigError, match="reward_weights"):
        GRPOConfig(rewards=["exact"], reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(group_size=1)


def read_prompts_of(tmp_path, records):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, records)
    return read_prompts(path)


def test_bad_prompt_lines_are_named_with_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n{bad\n"
                    + json.dumps({"messages": [U("a"), A("b")], "answer": "1"}) + "\n"
                    + json.dumps({"prompt": "no answer"}) + "\n")  # fmt: skip
    with pytest.raises(DataError) as e:
        read_prompts(path)
    msg = str(e.value)
    assert f"{path}:2: invalid JSON" in msg and f"{path}:3:" in msg and f"{path}:4: no \"answer\"" in msg
    assert f"{path}:1" not in msg


def sft(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    base = tiny_sft_run(tmp, [[U(f"{a}+{b}?"), A(str(a + b))] for a, b in PROBLEMS], block_size=32)
    prompts = tmp / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"{a}+{b}?", "answer": a + b} for a, b in PROBLEMS])
    return base, prompts


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return sft(tmp_path_factory)


def grpo_config(tmp_path, out, base, prompts, resume=False, **sections) -> TrainRunConfig:
    d = {
        "out_dir": str(tmp_path / out), "seed": 3, "device": "cpu", "experiment": "grpo",
        "data": dict(name="p", format="prompts", path=str(prompts), val_fraction=0.25),
        "train": dict(max_steps=4, batch_size=2, eval_interval=2, eval_steps=1, log_interval=1,
                      ckpt_interval=2, progress=False, peak_flops=1e12, dtype="fp32"),
        "optim": dict(lr=3e-3, warmup_steps=0),
        "grpo": dict(group_size=4, max_new_tokens=4, epochs=2, rewards=["exact", "regex:[0-9]"]),
        "wandb": dict(mode="disabled"),
    }
    d["init_from" if not resume else "resume"] = str(base) if not resume else True
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return TrainRunConfig.from_dict(d)


def weights(out):
    return torch.load(out / CKPT_NAME, map_location="cpu", weights_only=False)["model"]


def test_a_run_logs_rewards_and_resumes_exactly(sft_run, tmp_path):
    base, prompts = sft_run
    train(grpo_config(tmp_path, "a", base, prompts))
    records = [r for r in read_metrics(tmp_path / "a") if "val_accuracy" in r]
    assert [r["step"] for r in records] == [0, 2, 4]
    for k in ("val_reward", "val_reward_std", "val_accuracy", "val_length", "train_reward"):
        assert math.isfinite(records[-1][k])
    # stopped after step 3 (between the two epochs of rollout batch 1), then resumed
    train(grpo_config(tmp_path, "b", base, prompts), should_stop=lambda step: step == 3)
    train(grpo_config(tmp_path, "b", base, prompts, resume=True))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in weights(base).items() if k in a)


def test_lora_grpo_with_kl_trains_only_the_adapters(sft_run, tmp_path):
    base, prompts = sft_run
    train(grpo_config(tmp_path, "l", base, prompts, finetune=dict(method="lora"), grpo=dict(kl_coef=0.1)))
    saved = weights(tmp_path / "l")
    assert saved and all("lora" in k for k in saved)
    assert math.isfinite(read_metrics(tmp_path / "l")[-1]["val_kl"])


@pytest.mark.parametrize("fn", ["bad_reward", "nan_reward"])
def test_a_failing_reward_function_stops_the_run_naming_the_prompt(sft_run, tmp_path, fn):
    base, prompts = sft_run
    with pytest.raises(ConfigError, match=rf"reward 'tests.test_grpo:{fn}' .* at {prompts}:\d+"):
        train(grpo_config(tmp_path, "f", base, prompts, grpo=dict(rewards=[f"tests.test_grpo:{fn}"])))


def test_a_reward_that_does_not_import_stops_before_the_run_starts(tmp_path):
    """Checked before the model, the data or the run directory: nothing is loaded or written."""
    cfg = grpo_config(tmp_path, "x", tmp_path / "no_base", tmp_path / "no_prompts.jsonl",
                      grpo=dict(rewards=["no_such_module_xyz:f"]))  # fmt: skip
    with pytest.raises(ConfigError, match="cannot import"):
        train(cfg)
    assert not (tmp_path / "x").exists()
