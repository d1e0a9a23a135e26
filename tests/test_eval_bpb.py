"""Bits per byte: equal to a hand computation, windows that give every token its context, the
held-out split, and the command."""

import gzip
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_eval import save_run, tiny_model

from gpt.commands.eval import run as eval_main
from gpt.config import DataConfig
from gpt.data import corpus
from gpt.data.prepare import prepare
from gpt.data.shards import read_shard
from gpt.eval.bpb import (
    TextConfig,
    bits_per_byte,
    bytes_per_token,
    read_texts,
    score_documents,
    val_documents,
)
from gpt.eval.scoring import rolling_logprobs, windows

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"


def hand_nats(model, ids: list[int], block: int) -> float:
    """Sum of -log p(ids[t] | the block tokens before it), one forward per token."""
    total = 0.0
    for t in range(1, len(ids)):
        context = torch.tensor([ids[max(0, t - block) : t]])
        logp = F.log_softmax(model(context)[0, -1].float(), dim=-1)
        total -= logp[ids[t]].item()
    return total


def test_bpb_equals_a_hand_computation_on_a_short_text():
    model, tok = tiny_model(block_size=128)
    ids = [tok.eot_id, *tok.encode(TEXT)]  # fits one window: one forward gives every target
    logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
    nats = -sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1))
    result = bits_per_byte(model, tok, [TEXT])
    assert result["bytes"] == len(TEXT.encode()) and result["tokens"] == len(ids) - 1
    assert result["bpb"] == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_windows_with_stride_one_give_every_token_a_full_context():
    model, tok = tiny_model(block_size=16)
    ids = [tok.eot_id, *tok.encode(TEXT)]
    expected = hand_nats(model, ids, 16)
    assert -rolling_logprobs(model, ids, stride=1).sum().item() == pytest.approx(expected, rel=1e-5)
    # a larger stride scores every token exactly once, with less context for some: a different sum
    coarse = -rolling_logprobs(model, ids, stride=16, batch_size=3)
    assert coarse.numel() == len(ids) - 1 and coarse.sum().item() != pytest.approx(expected, rel=1e-6)


def test_windows_cover_every_target_once():
    for n, block, stride in [(2, 4, 2), (10, 4, 1), (50, 16, 5), (17, 16, 16), (100, 8, 8)]:
        scored = []
        for start, end, first in windows(n, block, stride):
            assert end - start <= block and first >= start
            assert first - start >= min(block - stride, first)  # the context before the first scored
            scored += range(first + 1, end + 1)
        assert scored == list(range(1, n))


def test_val_split_and_bytes_per_token(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    _, tok = tiny_model()
    cfg = TextConfig(path=str(path), split="val", val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    val = read_texts(cfg, tok)
    whole = path.read_text()
    assert len(val) == 1 and whole.endswith(val[0]) and len(val[0]) == round(0.1 * (len(whole) + 1)) - 1
    assert read_texts(TextConfig(path=str(path), max_bytes=20)) == ["line 0\nline 1\n"]
    assert bytes_per_token(tok, [torch.tensor(tok.encode("ab c")).numpy()]) == 1.0


def test_the_command_prints_and_writes_bpb(tmp_path, capsys):
    model, tok = tiny_model(block_size=32)
    run = save_run(tmp_path / "run", model, tok)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "bpb.json"
    eval_main(["bpb", f"ckpt={run}", f"data.path={text}", "stride=8", f"out={out}", "device=cpu"])
    result = json.loads(out.read_text())
    assert f"bpb {result['bpb']:.4f}" in capsys.readouterr().out
    expected = bits_per_byte(model, tok, [TEXT * 3], stride=8)["bpb"]
    assert result["bpb"] == pytest.approx(expected, rel=1e-4)


def _val_inputs(tmp_path):
    """A .txt file read in several pieces, a directory of JSONL documents, a gzipped .txt, and a
    text without a single newline."""
    lines = "".join(f"line {i}: {'word ' * (i % 7)}\n" for i in range(400))
    (tmp_path / "plain.txt").write_text(lines)
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = (f"doc {i}\n" * (1 + i % 5) for i in range(60))
    (docs / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "packed.txt.gz").write_bytes(gzip.compress(lines.encode() * 3))
    (tmp_path / "oneline.txt").write_text("no newline at all " * 300)
    return [tmp_path / "plain.txt", docs, tmp_path / "packed.txt.gz", tmp_path / "oneline.txt"]


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_bpb_val_split_is_the_val_split_training_prepares(tmp_path, monkeypatch, which):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 1000)  # the .txt comes in pieces
    path = _val_inputs(tmp_path)[which]
    # training prepares with its own tokenizer and cache; eval reads with the model's tokenizer alone
    data = prepare(DataConfig(name="v", path=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="char",
                              val_fraction=0.23), block_size=8, show_progress=False)  # fmt: skip
    tok = data.tokenizer
    val_ids = np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in data.val_shards]).tolist()
    assert len(val_ids) == round(0.23 * (data.train_tokens + data.val_tokens)) > 0
    text_cfg = TextConfig(path=str(path), split="val", val_fraction=0.23, cache_dir=str(tmp_path / "other"))
    docs = val_documents(text_cfg, tok)
    assert [t for d in docs for t in d] == [t for t in val_ids if t != tok.eot_id]
    assert "".join(read_texts(text_cfg, tok)) == tok.decode([t for t in val_ids if t != tok.eot_id])
    # a run that held out val_tokens after a max_tokens cut: the same keys give the same split
    cut = dict(val_tokens=40, max_tokens=400)
    data = prepare(DataConfig(name="v", path=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="char",
                              **cut), block_size=8, show_progress=False)  # fmt: skip
    val_ids = np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in data.val_shards]).tolist()
    assert data.val_tokens == 40
    docs = val_documents(TextConfig(path=str(path), split="val", cache_dir=str(tmp_path / "o2"), **cut), tok)
    assert [t for d in docs for t in d] == [t for t in val_ids if t != tok.eot_id]


def test_the_command_scores_trainings_val_split(tmp_path, capsys):
    model, tok = tiny_model(block_size=32)
    run = save_run(tmp_path / "run", model, tok)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 20)
    out = tmp_path / "bpb.json"
    eval_main(["bpb", f"ckpt={run}", f"data.path={text}", "data.split=val", "data.val_fraction=0.2",
               f"data.cache_dir={tmp_path / 'cache'}", "stride=8", f"out={out}", "device=cpu"])  # fmt: skip
    result = json.loads(out.read_text())
    data = prepare(DataConfig(name="x", path=str(text), cache_dir=str(tmp_path / "c2"), val_fraction=0.2),
                   block_size=8, tokenizer=tok, show_progress=False)  # fmt: skip
    ids = [t for p in data.val_shards for t in read_shard(p).tolist() if t != tok.eot_id]
    assert result["tokens"] == len(ids) == data.val_tokens - 1  # the val split ends with the document's eot
    expected = score_documents(model, tok, [(ids, len(tok.decode_bytes(ids)))], stride=8)["bpb"]
    assert result["bpb"] == pytest.approx(expected, rel=1e-4)
