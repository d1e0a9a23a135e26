"""Preference tuning (DPO) on tiny CPU runs: the loss against hand-computed values, pair files and
their errors, the reference log-prob cache (reused, invalidated), LoRA-DPO, and its metrics."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
from helpers_eval import tiny_sft_run, write_jsonl

from gpt.config import TrainRunConfig
from gpt.data.preference import read_pairs
from gpt.errors import ConfigError, DataError
from gpt.model import GPT, GPTConfig
from gpt.runs.metrics import read_metrics
from gpt.stage_config import DPOConfig
from gpt.train.loop import train
from gpt.train.objective import DPOObjective, dpo_losses, sequence_logps
from gpt.typed_config import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
PAIRS = [
    {"prompt": [U(f"What is {a} + {b}?")], "chosen": [A(str(a + b))], "rejected": [A(str(a + b + 1))]}
    for a in range(1, 5)
    for b in range(1, 4)
]


def test_dpo_loss_matches_a_hand_computed_2_pair_batch():
    # (chosen, rejected) log-probs of the policy and the reference, summed over each reply's tokens
    policy = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
    ref = torch.tensor([[-3.5, -4.5], [-4.0, -3.0]])
    beta = 0.5
    h = [(-3.0 + 3.5) - (-5.0 + 4.5), (-4.0 + 4.0) - (-2.0 + 3.0)]  # [1.0, -1.0]
    losses, m = dpo_losses(policy, ref, DPOConfig(beta=beta))
    expected = [math.log(1 + math.exp(-beta * v)) for v in h]  # -log sigmoid(beta h)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert m["reward_acc"].tolist() == [1.0, 0.0]
    assert m["margin"].tolist() == pytest.approx([beta * 1.0, beta * -1.0])
    ipo, _ = dpo_losses(policy, ref, DPOConfig(loss="ipo", beta=beta))
    assert ipo.tolist() == pytest.approx([(v - 1 / (2 * beta)) ** 2 for v in h])
    tokens = torch.tensor([2, 4])
    with_sft, _ = dpo_losses(policy, ref, DPOConfig(beta=beta, sft_weight=0.3), tokens)
    assert with_sft.tolist() == pytest.approx([expected[0] + 0.3 * 3.0 / 2, expected[1] + 0.3 * 4.0 / 4])


def test_the_objective_scores_only_the_reply_tokens_of_each_row():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 32, (4, 6))
    y = torch.full((4, 6), -1)
    y[:, 3:] = torch.randint(0, 32, (4, 3))  # the replies: the last 3 targets of each row
    ref = torch.zeros(2, 2)
    loss = DPOObjective(DPOConfig(beta=0.1), live_reference=False).loss(
        model, (x, y, ref), torch.device("cpu")
    )
    logp = torch.log_softmax(model(x), -1)
    by_hand = torch.stack([sum(logp[r, t, y[r, t]] for t in range(3, 6)) for r in range(4)])
    assert torch.allclose(sequence_logps(model(x), y)[0], by_hand, atol=1e-5)
    h = (by_hand[:2] - by_hand[2:]) * 0.1  # rows 0, 1 chosen; rows 2, 3 their rejected
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(h)).mean().item(), abs=1e-5)


def make_dialogs_module():
    spec = importlib.util.spec_from_file_location("make_dialogs", REPO_ROOT / "data" / "make_dialogs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logged(capsys) -> str:
    out = capsys.readouterr()
    return out.out + out.err


def test_prompt_and_hh_pairs_read_to_the_same_pair(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "Hi, who are you?", "chosen": "I am Quill.", "rejected": "No."}]
    )
    hh = {"chosen": "\n\nHuman: Hi, who are you?\n\nAssistant: I am Quill.",
          "rejected": "\n\nHuman: Hi, who are you?\n\nAssistant: No."}  # fmt: skip
    write_jsonl(tmp_path / "b.jsonl", [hh])
    full = {"prompt": [U("Hi, who are you?")], "chosen": [U("Hi, who are you?"), A("I am Quill.")],
            "rejected": [A("No.")]}  # fmt: skip
    write_jsonl(tmp_path / "c.jsonl", [full])
    got = [read_pairs(tmp_path / f"{n}.jsonl")[0][0] for n in "abc"]
    assert all(
        (p.prompt, p.chosen, p.rejected) == ([U("Hi, who are you?")], "I am Quill.", "No.") for p in got
    )


def test_bad_pairs_are_named_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [
        PAIRS[0],
        {"prompt": [U("Hi")], "chosen": "Hello", "rejected": "Hello"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Yes", "rejected": "\n\nHuman: Bye\n\nAssistant: No"},
        {"prompt": [U("Hi")], "chosen": "Hello", "rejected": "  "},
        '{"prompt": [',
        {"prompt": [], "chosen": "a", "rejected": "b"},
    ])  # fmt: skip
    with pytest.raises(DataError) as e:
        read_pairs(path)
    text = str(e.value)
    assert "5 malformed preference pair(s)" in text
    assert f"{path}:2: " in text and "identical" in text
    assert f"{path}:3: " in text and "share no prompt" in text
    assert f"{path}:4: " in text and "empty reply" in text
    assert f"{path}:5: invalid JSON" in text
    assert f"{path}:6: " in text and "empty" in text
    pairs, skipped = read_pairs(path, skip_invalid=True)
    assert len(pairs) == 1 and skipped == 5


def dpo_config(tmp_path, out, init_from, pairs_path, **sections) -> TrainRunConfig:
    d = {
        "out_dir": str(tmp_path / out), "seed": 3, "device": "cpu", "experiment": "dpo",
        "init_from": str(init_from) if init_from else None,
        "data": dict(name="pairs", format="pairs", path=str(pairs_path), val_fraction=0.25,
                     cache_dir=str(tmp_path / "cache")),
        "optim": dict(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        "train": dict(max_steps=6, batch_size=4, eval_interval=6, eval_steps=1, log_interval=3,
                      ckpt_interval=0, progress=False, peak_flops=1e12, dtype="fp32"),
        "dpo": dict(beta=0.5),
        "wandb": dict(mode="disabled"),
    }  # fmt: skip
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainRunConfig.from_dict(d)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny chat model (char tokenizer) that has seen every reply of PAIRS."""
    tmp = tmp_path_factory.mktemp("dpo")
    dialogs = [p["prompt"] + p[k] for p in PAIRS for k in ("chosen", "rejected")]
    base = tiny_sft_run(tmp, dialogs, block_size=48)
    pairs = tmp / "pairs.jsonl"
    write_jsonl(pairs, PAIRS)
    return base, pairs


def test_dpo_run_logs_preference_metrics_and_reuses_its_reference_cache(sft_run, tmp_path, capsys):
    base, pairs = sft_run
    train(dpo_config(tmp_path, "a", base, pairs))
    first = logged(capsys)
    assert "reference log-probs: computed for 12 pairs" in first
    records = read_metrics(tmp_path / "a")
    assert [r["step"] for r in records] == [0, 6]
    for split in ("train", "val"):
        for k in ("reward_acc", "margin", "chosen_logp", "rejected_logp"):
            assert math.isfinite(records[-1][f"{split}_{k}"])
    assert abs(records[0]["val_margin"]) < 1e-4  # policy = reference (up to float noise)
    assert records[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[-1]["train_margin"] > 0 and records[-1]["train_loss"] < math.log(2)
    cached = list((tmp_path / "cache").glob("pairs-reference-*.npy"))
    assert len(cached) == 1 and (tmp_path / "a" / "reference.npy").is_file()

    train(dpo_config(tmp_path, "b", base, pairs))  # same pairs, same initial model: the cache
    assert f"reference log-probs: reused {cached[0]}" in logged(capsys)
    same = lambda records: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]
    assert same(read_metrics(tmp_path / "b")) == same(read_metrics(tmp_path / "a"))

    changed = tmp_path / "changed.jsonl"  # one reply edited: recomputed
    write_jsonl(changed, [{**PAIRS[0], "rejected": [A("21")]}, *PAIRS[1:]])
    train(dpo_config(tmp_path, "c", base, changed))
    assert "reference log-probs: computed" in logged(capsys)
    train(dpo_config(tmp_path, "d", tmp_path / "a", pairs))  # another initial model: recomputed
    assert "reference log-probs: computed" in logged(capsys)
    assert len(list((tmp_path / "cache").glob("pairs-reference-*.npy"))) == 3

    # resume: the reference is the run's own copy (its initial weights are no longer at hand)
    resumed = dpo_config(tmp_path, "a", None, pairs, resume=True, train=dict(max_steps=8))
    train(resumed)
    assert f"reference log-probs: from {tmp_path / 'a' / 'reference.npy'}" in logged(capsys)
    assert read_metrics(tmp_path / "a")[-1]["step"] == 8


def test_demo_pairs_prefer_the_right_answer(tmp_path):
    gen = make_dialogs_module()
    gen.main(["--pairs", "--dialogs", "200", "--out", str(tmp_path / "pairs.jsonl")])
    pairs, skipped = read_pairs(tmp_path / "pairs.jsonl")
    assert len(pairs) == 200 and skipped == 0
    for p in pairs:
        assert p.chosen != p.rejected and p.prompt[-1]["role"] == "user"
        found = re.search(r"(\d+) ([+-]) (\d+)", p.prompt[-1]["content"])
        if found and "so " in p.chosen:
            a, op, b = found.groups()
            right = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert p.chosen.endswith(f"so {right}") and not p.rejected.endswith(f"so {right}")


def test_lora_dpo_keeps_the_base_frozen_and_caches_nothing(sft_run, tmp_path, capsys):
    base, pairs = sft_run
    cfg = dpo_config(tmp_path, "lora", base, pairs, finetune=dict(method="lora", lora_rank=4))
    train(cfg)
    assert "reference log-probs" not in logged(capsys)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "lora" / "reference.npy").exists()
    state = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)
    assert set(state["model"]) and all(k.endswith((".lora_A", ".lora_B")) for k in state["model"])
    records = read_metrics(tmp_path / "lora")
    assert records[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy = base
    assert records[-1]["train_margin"] > 0


def test_dpo_steps_do_not_depend_on_the_micro_batch_split(sft_run, tmp_path):
    base, pairs = sft_run
    cfgs = [dpo_config(tmp_path, name, base, pairs, train=dict(max_steps=4, eval_interval=2, **mbs))
            for name, mbs in (("one", {}), ("micro", {"micro_batch_size": 1}))]  # fmt: skip
    for cfg in cfgs:
        train(cfg)
    a, b = (read_metrics(cfg.out_dir) for cfg in cfgs)
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "val_loss", "train_margin", "val_chosen_logp"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5)  # metrics are rounded to 1e-6


def test_the_dpo_preset_is_the_whole_command():
    from gpt.commands.cli import compose_config
    from gpt.commands.train import TRAIN

    composed, given = compose_config(TRAIN, ["experiment=dpo", "init_from=out/chat", "data.path=p.jsonl"])
    cfg = TrainRunConfig.from_command_line(composed, given)
    assert (cfg.experiment, cfg.data.format, cfg.data.path, cfg.init_from) == (
        "dpo",
        "pairs",
        "p.jsonl",
        "out/chat",
    )
    assert cfg.model.given() == {} and cfg.dpo.loss == "sigmoid" and cfg.dpo.beta == 0.1
    with pytest.raises(ConfigError, match="dpo.beta"):
        DPOConfig(beta=0.0)
