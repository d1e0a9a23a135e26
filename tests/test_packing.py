"""Packed SFT batches: several dialogs per row with document masking give the same loss and
gradients as padded rows, a dialog never sees another one, and the batches are a pure function of
(seed, step) like the padded ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt.config import TrainRunConfig
from gpt.data.dialogs import Dialog
from gpt.data.sft import DialogBatches, PackedDialogBatches, pack_rows, render_all
from gpt.model import GPT, GPTConfig
from gpt.runs.metrics import read_metrics
from gpt.tokenizer import char_tokenizer
from gpt.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
DIALOGS = [
    [U("Hi"), A("Hello!")],
    [U("What is 12 + 30?"), A("2+0=2, 1+3=4, so 42")],
    [{"role": "system", "content": "Be brief."}, U("Name?"), A("Quill.")],
    [U("My name is Bob."), A("Hi Bob!"), U("What is my name?"), A("Bob.")],
    [U("ok"), A("ok")],
    [U("Count to five, please."), A("one two three four five")],
]


def examples(block_size: int = 96):
    tok = char_tokenizer(m["content"] + " User: Assistant: System:\n" for d in DIALOGS for m in d)
    ex, _, _ = render_all(tok, [Dialog(d, f"d:{i}") for i, d in enumerate(DIALOGS)], block_size, [])
    return tok, ex


def model(pos_emb: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=256, vocab_size=64, n_layer=2, n_head=2, n_embd=32, pos_emb=pos_emb))


def loss_and_grads(m: GPT, *batch) -> tuple[float, list[torch.Tensor]]:
    m.zero_grad()
    loss = m(batch[0], batch[1], doc_ids=batch[2]) if len(batch) == 3 else m(*batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_packed_and_padded_rows_give_the_same_loss_and_gradients(pos_emb):
    tok, ex = examples()
    padded = DialogBatches(ex, seed=0, pad_id=tok.eot_id).get(0, len(ex), 0, len(ex))  # one dialog per row
    rows = [[(np.asarray(ids[:-1]), np.where(np.asarray(mask[1:]) == 1, ids[1:], -1)) for ids, mask in ex[s]]
            for s in (slice(0, 3), slice(3, 5), slice(5, 6))]  # fmt: skip
    width = max(sum(len(x) for x, _ in r) for r in rows)
    packed = pack_rows(rows, width, tok.eot_id)
    assert packed[0].shape[0] == 3 and (packed[1] != -1).sum() == (padded[1] != -1).sum()
    m = model(pos_emb)
    loss_padded, grads_padded = loss_and_grads(m, *padded)
    loss_packed, grads_packed = loss_and_grads(m, *packed)
    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    for a, b in zip(grads_packed, grads_padded, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_a_dialog_never_attends_across_its_boundary(pos_emb):
    torch.manual_seed(1)
    m = model(pos_emb).eval()
    x = torch.randint(0, 64, (1, 30))
    doc = torch.tensor([[0] * 10 + [1] * 12 + [2] * 8])
    other = x.clone()
    other[0, :10] = torch.randint(0, 64, (10,))  # the first dialog changed
    other[0, 22:] = torch.randint(0, 64, (8,))  # and the last one
    with torch.no_grad():
        a, b = m(x, doc_ids=doc), m(other, doc_ids=doc)
        alone = m(x[:, 10:22])  # the middle dialog on its own, from position 0
    assert torch.allclose(a[0, 10:22], b[0, 10:22], atol=1e-6)
    assert torch.allclose(a[0, 10:22], alone[0], atol=1e-5)
    assert not torch.allclose(a[0, :10], b[0, :10])


def test_packed_batches_hold_every_dialog_once_per_epoch_and_are_reproducible():
    tok, ex = examples()
    ex = ex * 5  # 30 dialogs
    packed = PackedDialogBatches(ex, seed=3, pad_id=tok.eot_id, block_size=256)
    packed.order(0, 2)
    _, rows, batches = packed._epochs[0]  # epoch 0: its rows, and the rows of each batch
    assert sorted(i for r in rows for i in r) == list(range(len(ex)))  # every dialog in one row
    assert all(packed.lengths[r].sum() <= 256 for r in rows)
    per_epoch = len(batches)
    assert per_epoch == len(rows) // 2 and per_epoch <= len(ex) // 2 // 3  # a third of the padded batches
    seen = [i for step in range(per_epoch) for row in packed.order(step, 2) for i in row]
    assert len(set(seen)) == len(seen) and len(seen) >= len(ex) - max(len(r) for r in rows)  # a row left
    for step in range(per_epoch + 2):  # across an epoch boundary
        x, y, doc = packed.get(step, 2, 0, 2)
        assert x.shape[1] <= 256 and (doc[:, 0] == 0).all()
        again = PackedDialogBatches(ex, seed=3, pad_id=tok.eot_id, block_size=256)
        halves = [again.get(step, 2, s, 1) for s in (0, 1)]
        assert all(torch.equal(torch.cat([h[k] for h in halves]), t) for k, t in enumerate((x, y, doc)))
    assert 0 <= packed.padding_fraction(2) < 0.5


def test_sft_trains_with_packing(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGS * 4))
    cfg = TrainRunConfig.from_dict({
        "out_dir": str(tmp_path / "run"), "seed": 1, "device": "cpu",
        "model": dict(block_size=96, n_layer=1, n_head=2, n_embd=32, bias=False, norm="rmsnorm",
                      pos_emb="rope"),
        "data": dict(name="d", format="dialogs", path=str(path), tokenizer="char", val_fraction=0.25,
                     packing=True),
        "optim": dict(lr=1e-2, warmup_steps=2),
        "train": dict(max_steps=20, batch_size=2, eval_interval=20, eval_steps=2, log_interval=10,
                      ckpt_interval=0, progress=False, peak_flops=1e12),
        "wandb": dict(mode="disabled"),
    })  # fmt: skip
    train(cfg)
    assert ", packed" in capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    assert records[-1]["train_loss"] < records[0]["train_loss"] and records[-1]["val_loss"] is not None
