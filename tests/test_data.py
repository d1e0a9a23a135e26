"""Tests for gpt.data (shards, corpus, prepare): shard format, reading user text, cached preparation
and token windows."""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt.data.encode as encode
from gpt.commands.prepare import run as prepare_main
from gpt.config import DataConfig
from gpt.data.corpus import iter_documents, iter_pieces
from gpt.data.prepare import load_prepared, prepare
from gpt.data.shards import TokenWindows, read_shard, write_shard
from gpt.errors import DataError
from gpt.tokenizer_load import gpt2_tokenizer as load_gpt2
from gpt.typed_config import REPO_ROOT

gpt2_tokenizer = functools.cache(load_gpt2)  # loading the 50k ranks takes a moment: once per session


def corpus(n_lines: int, seed: int = 0) -> str:
    """Play-like text: speaker lines, blank lines, indented lines and some non-ASCII characters."""
    rng = random.Random(seed)
    words = ["the", "king", "shall", "not", "die", "café", "naïve", "—", "ÆTHER", "😀", "to", "be", "42"]
    lines = []
    for i in range(n_lines):
        kind = i % 7
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        lines.append("" if kind == 3 else ("  " + body if kind == 5 else body.capitalize()))
    return "\n".join(lines) + "\n"


def cfg_for(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(name="t", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def tokens(paths) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in paths])


# ---------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("vocab_size, itemsize", [(1000, 2), (65536, 2), (100_000, 4)])
def test_shard_round_trip(tmp_path, vocab_size, itemsize):
    toks = np.random.default_rng(0).integers(0, vocab_size, size=5000)
    write_shard(tmp_path / "s.bin", toks, vocab_size)
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype.itemsize == itemsize and not back.flags.writeable
    np.testing.assert_array_equal(back, toks)
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 5000 * itemsize
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # no temp file left behind


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + np.int32(99).tobytes() + b[8:], "version 99"),
        (lambda b: b[:-3], "header promises 100 tokens"),
        (lambda b: b[:500], "truncated header"),
    ],
)
def test_read_shard_rejects_corrupt_files(tmp_path, damage, message):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), 1000)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        read_shard(path)
    assert str(path) in str(e.value) and "delete the cache folder" in str(e.value)


# ------------------------------------------------------------------------------------ user text
def test_iter_documents_file_dir_glob_and_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first doc\n")
    (tmp_path / "b" / "c.txt").write_text("second doc")
    (tmp_path / "b" / "d.jsonl").write_text('{"body": "third"}\n\n{"body": "fourth\\nline"}\n')
    (tmp_path / "b" / "ignored.md").write_text("not text input")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["first doc\n"]
    assert list(iter_documents(str(tmp_path), text_field="body")) == [
        "first doc\n",
        "second doc",
        "third",
        "fourth\nline",
    ]
    assert list(iter_documents(str(tmp_path / "**" / "*.txt"))) == ["first doc\n", "second doc"]
    assert list(iter_documents(str(tmp_path / "b" / "*.jsonl"), "body")) == ["third", "fourth\nline"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", b"", "is empty"),
        ("bin.txt", b"abc\x00\x01\x02", "binary"),
        ("latin.txt", b"line one\ncaf\xe9\n", r"latin.txt:2: invalid UTF-8 at byte offset 12"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', 'nofield.jsonl:3: no text field "text"'),
        ("number.jsonl", b'{"text": 7}\n', 'number.jsonl:1: "text" is a number, not a JSON string'),
        ("nomatch-*.txt", None, "no files match"),
    ],
)
def test_iter_documents_bad_inputs(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents(str(tmp_path / name)))


def test_directory_of_only_empty_files_and_no_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="hold no text"):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("not an input file")
    with pytest.raises(DataError, match=r"no \.txt, \.jsonl .* or \.parquet files"):
        list(iter_documents(str(tmp_path / "sub")))


def test_big_file_streams_in_pieces_that_tokenize_like_the_whole(tmp_path):
    text = corpus(4000)  # ~150 kB with multi-byte characters straddling read boundaries
    path = tmp_path / "big.txt"
    path.write_text(text)
    pieces = list(iter_pieces(str(path), chunk_bytes=4096))
    assert len(pieces) > 20 and "".join(p.text for p in pieces) == text
    assert [p.doc_end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(p.nbytes for p in pieces) == path.stat().st_size
    assert all(p.text.endswith("\n") and len(p.text.encode()) <= 2 * 4096 for p in pieces[:-1])
    tok = gpt2_tokenizer()  # cuts only where GPT-2 pre-tokenization already splits
    assert sum((tok.encode(p.text) for p in pieces), []) == tok.encode(text)


def test_line_without_breaks_is_cut_at_a_bound(tmp_path):
    text = "é" * 100_000  # 200 kB, no newline: cut at a character boundary after 16 chunks
    (tmp_path / "one.txt").write_text(text)
    pieces = list(iter_documents(str(tmp_path / "one.txt"), chunk_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text


# ----------------------------------------------------------------------------------- preparation
def test_prepare_splits_train_val_and_ends_documents_with_eot(tmp_path):
    text = corpus(600)
    (tmp_path / "in.txt").write_text(text)
    d = prepare(cfg_for(tmp_path, tmp_path / "in.txt"), block_size=16, show_progress=False)
    tok = d.tokenizer
    assert tok.kind == "char" and d.has_val
    train, val = tokens(d.train_shards), tokens(d.val_shards)
    assert (len(train), len(val)) == (d.train_tokens, d.val_tokens)
    assert len(val) == round(0.1 * (len(train) + len(val)))  # the last 10% of the tokens is val
    assert eot_free(train, tok) and val[-1] == tok.eot_id and eot_free(val[:-1], tok)
    assert tok.decode(train.tolist()) + tok.decode(val[:-1].tolist()) == text
    meta = json.loads((d.directory / "meta.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["tokenizer"] == "char"
    same = load_prepared(d.directory)
    assert same.train_shards == d.train_shards and same.tokenizer.fingerprint() == tok.fingerprint()


def eot_free(a: np.ndarray, tok) -> bool:
    return bool((a != tok.eot_id).all())


def test_prepare_directory_separates_documents_and_keeps_jsonl_documents_whole(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    docs = [f"document {i} " + "word " * (i % 5) for i in range(40)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = cfg_for(tmp_path, src, tokenizer="gpt2", val_fraction=0.25)
    d = prepare(cfg, block_size=8, show_progress=False)
    tok = d.tokenizer
    train, val = tokens(d.train_shards), tokens(d.val_shards)

    def split_docs(a):
        return tok.decode(a.tolist()).split("<|endoftext|>")

    assert split_docs(train)[-1] == "" and split_docs(val)[-1] == ""  # each split ends with an eot
    got = split_docs(train)[:-1] + split_docs(val)[:-1]
    assert got == docs and 25 < len(split_docs(train)) < 35


def test_prepare_reuses_cache_and_input_change_invalidates_it(tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text(corpus(300))
    cfg = cfg_for(tmp_path, path)
    first = prepare(cfg, block_size=8)
    assert "tokenizing" in capsys.readouterr().err  # the progress bar
    stamps = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    again = prepare(cfg, block_size=8)
    assert "tokenizing" not in capsys.readouterr().err  # nothing was tokenized
    assert (
        again.directory == first.directory and again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    )
    assert {p.name: p.stat().st_mtime_ns for p in again.directory.iterdir()} == stamps  # not rewritten
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.directory.name]  # no temp folder
    path.write_text(corpus(300) + "More text.\n")
    changed = prepare(cfg, block_size=8, show_progress=False)
    assert changed.directory != first.directory and changed.train_tokens > first.train_tokens


def test_resume_with_the_built_tokenizer_reuses_its_folder(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(corpus(100))
    cfg = cfg_for(tmp_path, tmp_path / "in.txt")
    first = prepare(cfg, block_size=8)
    capsys.readouterr()
    again = prepare(cfg, block_size=8, tokenizer=first.tokenizer)  # as resume=true passes it back
    assert again.directory == first.directory and "tokenizing" not in capsys.readouterr().err
    other = prepare(cfg, block_size=8, tokenizer=gpt2_tokenizer())  # a different tokenizer: new shards
    assert other.directory != first.directory and "tokenizing" in capsys.readouterr().err


def test_a_folder_built_with_other_special_tokens_is_not_reused(tmp_path, monkeypatch):
    """A corpus-built tokenizer cached by a version with fewer special tokens (before the tool tokens)
    must not come back from the cache: the recipe that keys it names the special tokens."""
    import gpt.data.prepare as prepare_module

    (tmp_path / "in.txt").write_text(corpus(100))
    cfg = cfg_for(tmp_path, tmp_path / "in.txt")
    monkeypatch.setattr(prepare_module, "NEW_SPECIALS", ("<|endoftext|>", "<|end_of_turn|>"))
    old = prepare(cfg, block_size=8, show_progress=False)
    monkeypatch.undo()
    now = prepare(cfg, block_size=8, show_progress=False)
    assert now.directory != old.directory and now.tokenizer.has_tools


def test_incomplete_cache_folder_is_rebuilt(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(corpus(100))
    cfg = cfg_for(tmp_path, path)
    d = prepare(cfg, block_size=8, show_progress=False)
    (d.directory / "meta.json").unlink()  # as if interrupted before the folder was complete
    (d.directory / "train_000000.bin").write_bytes(b"garbage")
    again = prepare(cfg, block_size=8, show_progress=False)
    assert again.directory == d.directory and len(read_shard(again.train_shards[0])) == d.train_tokens


def test_given_tokenizer_is_used_as_is(tmp_path):
    (tmp_path / "in.txt").write_text(corpus(100))
    tok = gpt2_tokenizer()
    d = prepare(cfg_for(tmp_path, tmp_path / "in.txt", tokenizer="char"), block_size=8, tokenizer=tok)
    assert d.tokenizer is tok and tokens(d.train_shards).max() > 255  # gpt2 ids, not a char vocab


def test_val_fraction_zero_has_no_val(tmp_path):
    (tmp_path / "in.txt").write_text(corpus(50))
    d = prepare(cfg_for(tmp_path, tmp_path / "in.txt", val_fraction=0.0), block_size=8, show_progress=False)
    assert not d.has_val and d.val_shards == [] and d.val_tokens == 0
    assert tokens(d.train_shards)[-1] == d.tokenizer.eot_id


def test_too_little_text_for_one_window(tmp_path):
    (tmp_path / "in.txt").write_text("To be, or not to be:\nthat is the question.\n")
    with pytest.raises(DataError, match=r"in\.txt.*block_size \+ 1 = 65.*smaller model\.block_size"):
        prepare(cfg_for(tmp_path, tmp_path / "in.txt"), block_size=64, show_progress=False)
    d = prepare(cfg_for(tmp_path, tmp_path / "in.txt", val_fraction=0.0), block_size=32, show_progress=False)
    assert d.train_tokens == 44


def test_parallel_tokenization_matches_single_process(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK_BYTES", 8192)  # many tasks from a small file
    monkeypatch.setattr(encode, "PARALLEL_MIN_BYTES", 0)
    (tmp_path / "in.txt").write_text(corpus(3000))
    tok = gpt2_tokenizer()
    out = []
    for workers in (1, 2):
        cfg = cfg_for(tmp_path / str(workers), tmp_path / "in.txt", num_workers=workers, shard_tokens=5000)
        d = prepare(cfg, block_size=8, tokenizer=tok, show_progress=False)
        assert len(d.train_shards) > 2 and all(len(read_shard(p)) <= 5000 for p in d.train_shards)
        out.append((tokens(d.train_shards), tokens(d.val_shards)))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)
    assert tok.decode(out[0][0].tolist() + out[0][1][:-1].tolist()) == corpus(3000)


def test_command_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(corpus(100))
    prepare_main([str(tmp_path / "in.txt"), "data.tokenizer=char", f"data.cache_dir={tmp_path / 'c'}"])
    out = capsys.readouterr().out
    assert str(tmp_path / "c") in out and "train:" in out and "val:" in out
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(tmp_path / "missing.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.txt not found" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------- batches
@pytest.fixture
def shards(tmp_path):
    """Three shards whose tokens say where they came from: shard k holds 1000*k + 0, 1, 2, ..."""
    paths = []
    for k, n in enumerate([300, 40, 500]):
        paths.append(tmp_path / f"train_{k:06d}.bin")
        write_shard(paths[-1], 1000 * (k + 1) + np.arange(n), 100_000)
    return paths


def test_windows_are_deterministic_and_vary_by_step(shards):
    w = TokenWindows(shards, block_size=32, seed=7)
    x1, y1 = w.get(3, 16, 0, 16)
    x2, y2 = TokenWindows(shards, block_size=32, seed=7).get(3, 16, 0, 16)
    assert x1.shape == y1.shape == (16, 32) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one
    assert not torch.equal(w.get(4, 16, 0, 16)[0], x1)
    assert not torch.equal(TokenWindows(shards, 32, seed=8).get(3, 16, 0, 16)[0], x1)


def test_batch_split_over_ranks_and_micro_steps_matches_whole(shards):
    w = TokenWindows(shards, block_size=16, seed=0)
    whole_x, whole_y = w.get(11, 8, 0, 8)
    world, micro = 2, 2  # rank r, micro-step m: positions [r*4 + m*2, +2)
    spans = [(r * 4 + m * 2, 2) for r in range(world) for m in range(micro)]
    assert sorted(i for s, c in spans for i in range(s, s + c)) == list(range(8))  # disjoint cover
    for s, c in spans:
        x, y = w.get(11, 8, s, c)
        assert torch.equal(x, whole_x[s : s + c]) and torch.equal(y, whole_y[s : s + c])
    with pytest.raises(ValueError):
        w.get(11, 8, 6, 4)


def test_windows_never_cross_shards_and_cover_all_of_them(shards):
    w = TokenWindows(shards, block_size=64, seed=1)  # shard 1 (40 tokens) holds no window
    assert w.n_windows == (300 - 64) + (500 - 64)
    seen = set()
    for step in range(50):
        x, y = w.get(step, 32, 0, 32)
        full = torch.cat([x, y[:, -1:]], dim=1)
        assert ((full[:, 1:] - full[:, :-1]) == 1).all()  # consecutive tokens of one shard
        seen |= set((full[:, 0] // 1000).tolist())
        assert (full % 1000 < torch.tensor([0, 300, 40, 500])[full // 1000]).all()
    assert seen == {1, 3}
    with pytest.raises(DataError, match="no shard holds a window"):
        TokenWindows(shards[1:2], block_size=64, seed=0)


def test_preparing_in_one_process_never_imports_torch(tmp_path):
    # gpt.ranks (shared with training) imports torch only for the agreements of several ranks
    (tmp_path / "in.txt").write_text(corpus(200))
    cfg = f"DataConfig(path={str(tmp_path / 'in.txt')!r}, cache_dir={str(tmp_path)!r})"
    code = "import sys; from gpt.config import DataConfig; from gpt.data.prepare import prepare; "
    code += f"prepare({cfg}, 8); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True).returncode == 0
