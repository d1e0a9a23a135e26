"""Evaluation during training: val_bpb beside val_loss, and train.eval_tasks scored at each eval,
in metrics.jsonl."""

import json
import math

import numpy as np
import pytest

from gpt.data.prepare import prepare
from gpt.data.shards import read_shard
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evals_log_val_bpb_and_task_scores(make_cfg, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "ROMEO:", "choices": ["x", "y"], "answer": 0}) + "\n")
    cfg = make_cfg(train={"max_steps": 10, "eval_interval": 5, "eval_tasks": ["cloze", str(mc)]})
    train(cfg)
    records = read_metrics(cfg.out_dir)
    assert [r["step"] for r in records] == [0, 5, 10]
    # bytes per token of the val split, counted here from its decoded text
    prepared = prepare(cfg.data, cfg.model.block_size)
    val = np.concatenate([np.asarray(read_shard(p)) for p in prepared.val_shards])
    text_bytes = sum(len(prepared.tokenizer.decode_bytes([t])) for t in val if t != prepared.tokenizer.eot_id)
    for r in records:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * len(val) / text_bytes, rel=1e-4)
        assert 0.0 <= r["cloze/acc"] <= 1.0 and r["mc/acc"] in (0.0, 1.0) and "cloze/acc_norm" in r
    assert records[-1]["val_bpb"] < records[0]["val_bpb"]
