"""Nothing lost, nothing forged: a fine-tune never replaces the run it starts from; a corpus file
changed while it is prepared never leaves wrong tokens in the cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import gpt.data.prepare as prep
from gpt.commands.train import train_main
from gpt.config import DataConfig
from gpt.data.corpus import input_files, iter_documents
from gpt.data.shards import read_shard
from gpt.errors import DataError

TINY = [
    "device=cpu", "wandb.mode=disabled", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
    "model.block_size=16", "train.max_steps=2", "train.eval_interval=0", "train.batch_size=2",
    "train.peak_flops=1e12", "train.log_interval=1", "data.tokenizer=char", "data.num_workers=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("base")
    train_main([*TINY, f"data.path={corpus}", f"data.cache_dir={root / 'cache'}", f"out_dir={root / 'run'}"])
    return root / "run"


@pytest.mark.parametrize("where", ["same", "file", "inside"])
def test_finetune_into_its_own_base_run_is_refused_before_anything_moves(base_run, corpus, capsys, where):
    before = {p.name: p.read_bytes() for p in base_run.iterdir() if p.is_file()}
    init_from = base_run / "ckpt.pt" if where == "file" else base_run
    out_dir = base_run / "ft" if where == "inside" else base_run
    with pytest.raises(SystemExit) as exit_info:
        train_main(["experiment=finetune", f"init_from={init_from}", f"out_dir={out_dir}", "overwrite=true",
                    *TINY, f"data.path={corpus}", f"data.cache_dir={base_run.parent / 'cache'}"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "choose another out_dir" in err[-1] and f"init_from={init_from}" in err[-1]
    assert {p.name: p.read_bytes() for p in base_run.iterdir() if p.is_file()} == before


def test_a_file_changed_during_preparation_never_poisons_the_cache(tmp_path, monkeypatch):
    """The key is the content hash taken before reading; a write after it (here: right after the
    hash, a real write to the real file) must not leave the changed file's tokens under that key."""
    path = tmp_path / "in.txt"
    original = "".join(f"line {i}: the quick brown fox\n" for i in range(300))
    path.write_text(original)
    real_digest = prep.content_digest

    def digest_then_edit(p):
        digest = real_digest(p)
        p.write_text(original.replace("quick", "QUICK"))  # same size, other bytes
        return digest

    cfg = DataConfig(name="t", path=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="char")
    monkeypatch.setattr(prep, "content_digest", digest_then_edit)
    with pytest.raises(DataError, match="changed while it was being prepared"):
        prep.prepare(cfg, block_size=8, show_progress=False)
    monkeypatch.setattr(prep, "content_digest", real_digest)
    path.write_text(original)  # restored: its key is the first attempt's
    data = prep.prepare(cfg, block_size=8, show_progress=False)
    ids = [t for p in [*data.train_shards, *data.val_shards] for t in read_shard(p).tolist()]
    assert data.tokenizer.decode([t for t in ids if t != data.tokenizer.eot_id]) == original


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_a_data_path_that_is_a_fifo_or_a_device_says_what_it_is(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    else:
        path = Path("/dev/null")
    cfg = DataConfig(name="t", path=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="char")
    what = "a named pipe (FIFO)" if kind == "fifo" else "a character device"
    with pytest.raises(DataError, match=re.escape(f"{path} is {what}, not a regular file")):
        prep.prepare(cfg, block_size=8, show_progress=False)


@pytest.mark.parametrize(("value", "what"), [("42", "a number"), ('["a"]', "a list"), ("null", "null")])
def test_a_jsonl_text_of_the_wrong_type_is_named_as_such(tmp_path, value, what):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ' + value + "}\n")
    with pytest.raises(DataError) as e:
        list(iter_documents(path))
    assert str(e.value) == f'{path}:2: "text" is {what}, not a JSON string; fix or remove that line'


def test_skipped_files_of_a_data_directory_are_mentioned(tmp_path, capsys):
    for name in ("a.txt", "b.csv", "c.md", "d.md"):
        (tmp_path / name).write_text("hello\n")
    assert input_files(tmp_path) == [tmp_path / "a.txt"]
    err = capsys.readouterr().err
    assert f"3 files under {tmp_path} skipped (.csv, .md)" in err and err.count("\n") == 1
