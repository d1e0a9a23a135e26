"""Corpora as they are published (Parquet, .jsonl.gz/.zst, .txt.gz), token-count cuts, and preparation
shared by the ranks of a torchrun job.

    pytest tests/test_corpora.py
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt.data.prepare as prep
from gpt.config import DataConfig
from gpt.data.corpus import input_units, iter_documents
from gpt.data.prepare import prepare
from gpt.data.shards import read_shard
from gpt.errors import ConfigError, DataError
from gpt.typed_config import REPO_ROOT

pa = pytest.importorskip("pyarrow")  # the [data] extra
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")


def documents(n: int) -> list[str]:
    """Varied documents: several lines, blank lines, non-ASCII characters, some long."""
    words = ["the", "king", "shall", "café", "naïve", "—", "😀", "to", "be", "42", "\n", "\n\n"]
    return [
        (f"Doc {i}: " + " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 40))).strip()
        for i in range(n)
    ]


def jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)).encode()


def write_parquet(path: Path, docs: list[str], rows_per_group: int = 50, column: str = "text") -> Path:
    table = pa.table({"id": list(range(len(docs))), column: docs})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def cfg_for(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return DataConfig(name="t", path=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="char", **kw)


def shard_tokens(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in paths] or [np.zeros(0, int)])


@pytest.fixture
def docs() -> list[str]:
    return documents(400)


@pytest.fixture
def formats(tmp_path, docs) -> dict[str, Path]:
    """The same documents as .parquet (8 row groups), .jsonl, .jsonl.gz and .jsonl.zst."""
    d = tmp_path / "in"
    d.mkdir()
    raw = jsonl_bytes(docs)
    (d / "c.jsonl").write_bytes(raw)
    (d / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    return {
        "parquet": write_parquet(d / "c.parquet", docs),
        **{k: d / f"c.{k}" for k in ("jsonl", "jsonl.gz", "jsonl.zst")},
    }


# --------------------------------------------------------------------------------------- readers
def test_every_format_reads_the_same_documents(formats, docs):
    for path in formats.values():
        assert list(iter_documents(path)) == docs, path
    units = input_units([formats["parquet"]])
    assert [u.row_group for u in units] == list(range(8))  # one unit per row group
    assert sum(u.nbytes for u in units) < formats["parquet"].stat().st_size


def test_every_format_gives_the_same_train_and_val_tokens(tmp_path, formats, docs):
    """One val split for every container: the last val_fraction of the tokens (it was a fraction of
    the compressed bytes: .jsonl.zst lost 46% of a corpus to val)."""
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, doc in enumerate(docs):  # .txt: one document per file
        (txt / f"{i:04d}.txt").write_text(doc)
    splits = {}
    for name, path in {"txt": txt, **formats}.items():
        d = prepare(cfg_for(tmp_path / name, path), block_size=8, show_progress=False)
        splits[name] = (shard_tokens(d.train_shards).tolist(), shard_tokens(d.val_shards).tolist())
        assert (d.train_tokens, d.val_tokens) == tuple(map(len, splits[name])), name
    counts = {k: tuple(map(len, s)) for k, s in splits.items()}
    assert all(s == splits["txt"] for s in splits.values()), counts
    n_train, n_val = map(len, splits["txt"])
    assert n_val == round(0.1 * (n_train + n_val))


def test_directory_and_glob_mix_formats_in_name_order(tmp_path):
    d = tmp_path / "mix"
    (d / "sub").mkdir(parents=True)
    write_parquet(d / "a.parquet", ["pq one", "pq two"])
    (d / "b.txt.gz").write_bytes(gzip.compress(b"gz text\nline two\n"))
    (d / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(["zst doc"])))
    (d / "sub" / "d.txt").write_text("plain")
    (d / "notes.md").write_text("not an input")
    assert list(iter_documents(d)) == ["pq one", "pq two", "gz text\nline two\n", "zst doc", "plain"]
    assert list(iter_documents(str(d / "**" / "*.zst"))) == ["zst doc"]


def test_text_field_names_the_parquet_column_and_jsonl_field_still_works(tmp_path):
    path = write_parquet(tmp_path / "b.parquet", ["x", "y"], column="body")
    assert list(iter_documents(path, text_field="body")) == ["x", "y"]
    assert DataConfig(jsonl_field="body").text_field == "body"  # the older name
    with pytest.raises(ConfigError, match="val_tokens"):
        DataConfig(max_tokens=100, val_tokens=100)


# ------------------------------------------------------------------------------- identical shards
def test_parquet_jsonl_gz_and_zst_give_identical_shards(tmp_path, formats, capsys):
    got = {}
    for kind, path in formats.items():
        cfg = cfg_for(tmp_path / kind, path, val_tokens=300)
        d = prepare(cfg, block_size=16)
        got[kind] = (shard_tokens(d.train_shards), shard_tokens(d.val_shards), d.tokenizer.fingerprint())
    err = capsys.readouterr().err
    assert "tokens/s" in err and "tokenizing" in err  # the progress bar
    assert f"data: {len(got['parquet'][0]):,} train tokens, 300 val tokens in 2 shards (cache " in err
    ref = got.pop("parquet")
    assert len(ref[1]) == 300
    for kind, (train, val, fp) in got.items():
        np.testing.assert_array_equal(train, ref[0], err_msg=kind)
        np.testing.assert_array_equal(val, ref[1], err_msg=kind)
        assert fp == ref[2]


def test_max_tokens_and_val_tokens_cut_the_token_stream(tmp_path, monkeypatch, docs):
    monkeypatch.setattr(prep, "PART_BYTES", 2000)  # many parts: max_tokens stops before the last ones
    path = write_parquet(tmp_path / "c.parquet", docs, rows_per_group=10)
    whole = prepare(cfg_for(tmp_path / "all", path, val_fraction=0.0), block_size=8, show_progress=False)
    stream = shard_tokens(whole.train_shards)
    d = prepare(
        cfg_for(tmp_path / "cut", path, max_tokens=5000, val_tokens=1200), block_size=8, show_progress=False
    )
    train, val = shard_tokens(d.train_shards), shard_tokens(d.val_shards)
    assert (len(train), len(val), d.train_tokens, d.val_tokens) == (3800, 1200, 3800, 1200)
    np.testing.assert_array_equal(np.concatenate([train, val]), stream[:5000])
    meta = json.loads((d.directory / "meta.json").read_text())
    assert meta["train_shards"] == [p.name for p in d.train_shards] and meta["max_tokens"] == 5000
    assert sorted(p.name for p in d.directory.iterdir() if not p.name.startswith(("train_", "val_"))) == [
        "meta.json",
        "tokenizer.json",
    ]  # no leftover part files
    frac = prepare(cfg_for(tmp_path / "frac", path, max_tokens=5000), block_size=8, show_progress=False)
    assert (frac.train_tokens, frac.val_tokens) == (4500, 500)  # val_fraction 0.1 of the kept tokens


def test_parts_keep_the_byte_split_of_one_stream(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    texts = ["\n".join(documents(60)[i::3]) + "\n" for i in range(3)]
    for i, t in enumerate(texts):
        (tmp_path / "d" / f"{i}.txt").write_text(t)
    one = prepare(cfg_for(tmp_path / "one", tmp_path / "d"), block_size=8, show_progress=False)
    monkeypatch.setattr(prep, "PART_BYTES", 1)  # every file its own part (and its own shards)
    many = prepare(cfg_for(tmp_path / "many", tmp_path / "d"), block_size=8, show_progress=False)
    assert len(many.train_shards) == 3 and len(one.train_shards) == 1
    np.testing.assert_array_equal(shard_tokens(one.train_shards), shard_tokens(many.train_shards))
    np.testing.assert_array_equal(shard_tokens(one.val_shards), shard_tokens(many.val_shards))


def test_compressed_text_is_split_at_a_line_start_near_its_share_of_the_file(tmp_path):
    text = "\n".join(documents(300)) + "\n"
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(text.encode()))
    d = prepare(cfg_for(tmp_path, tmp_path / "t.txt.gz"), block_size=8, show_progress=False)
    train, val = (d.tokenizer.decode(shard_tokens(s).tolist()) for s in (d.train_shards, d.val_shards))
    assert train.endswith("\n") and train + val == text + "<|endoftext|>"
    assert 0.8 < len(train) / len(text) < 0.97  # the last ~10% of the (compressed) bytes


# ---------------------------------------------------------------------------------------- errors
def truncated_gz(path: Path, docs: list[str]) -> Path:
    raw = gzip.compress(jsonl_bytes(docs))
    path.write_bytes(raw[: len(raw) // 2])
    return path


def truncated_zst(path: Path, docs: list[str]) -> Path:
    raw = zstandard.ZstdCompressor().compress(jsonl_bytes(docs))
    path.write_bytes(raw[: len(raw) // 2])
    return path


def truncated_parquet(path: Path, docs: list[str]) -> Path:
    raw = write_parquet(path, docs).read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def damaged_parquet(path: Path, docs: list[str]) -> Path:
    """Garbage over the first data page of row group 2 (of 8): the footer still reads."""
    write_parquet(path, docs)
    column = pq.ParquetFile(path).metadata.row_group(2).column(1)  # "text"
    raw = bytearray(path.read_bytes())
    raw[column.data_page_offset + 20 : column.data_page_offset + 84] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    "name, make, message",
    [
        (
            "nocol.parquet",
            lambda p, d: write_parquet(p, d, column="body"),
            r'no column "text" \(columns: id, body\)',
        ),
        ("cut.jsonl.gz", truncated_gz, r"cut\.jsonl\.gz:\d+: corrupt or truncated file"),
        ("cut.jsonl.zst", truncated_zst, r"cut\.jsonl\.zst:\d+: corrupt or truncated file"),
        ("cut.parquet", truncated_parquet, r"cut\.parquet: corrupt or truncated file"),
        ("bad.parquet", damaged_parquet, r"bad\.parquet: row group 2: corrupt or truncated file"),
        (
            "cut.txt.gz",
            lambda p, d: p.write_bytes(gzip.compress("\n".join(d).encode())[:-9]),
            r"cut\.txt\.gz:\d+",
        ),
    ],
)
def test_broken_inputs_give_one_line_and_leave_no_cache_entry(tmp_path, docs, name, make, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a good file first\n" * 50)
    make(tmp_path / "in" / name, docs)
    with pytest.raises(DataError, match=message) as e:
        prepare(cfg_for(tmp_path, tmp_path / "in"), block_size=8, show_progress=False)
    assert "\n" not in str(e.value) and str(tmp_path / "in" / name) in str(e.value)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------------- many ranks
DRIVER = """
import sys
import gpt.data.prepare as prep
from gpt.commands.prepare import run
prep.PART_BYTES = int(sys.argv[1])  # small parts: a small corpus still gives every rank work
run(sys.argv[2:])
"""


def test_two_gloo_ranks_give_the_shards_of_one_process_and_share_its_cache(
    tmp_path, docs, monkeypatch, capsys
):
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", docs[:200], rows_per_group=20)
    (src / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs[200:300])))
    (src / "c.txt").write_text("\n".join(docs[300:]) + "\n")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    args = ["1000", str(src), "data.tokenizer=char", f"data.cache_dir={tmp_path / 'c2'}"]
    p = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert out.count("data: ") == 1 and "tokenizing" in out  # rank 0 reports for both
    (two,) = list((tmp_path / "c2").iterdir())

    monkeypatch.setattr(prep, "PART_BYTES", 1000)
    one = prepare(cfg_for(tmp_path / "one", src), block_size=8, show_progress=False).directory
    assert one.name.split("-")[-1] == two.name.split("-")[-1]  # the same cache key
    meta1, meta2 = (json.loads((d / "meta.json").read_text()) for d in (one, two))
    assert len(meta1["train_shards"]) >= 5 and meta1["train_shards"] == meta2["train_shards"]
    assert meta1["val_shards"] == meta2["val_shards"] == ["val_000000.bin"]
    for name in meta1["train_shards"] + meta1["val_shards"] + ["tokenizer.json"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name

    capsys.readouterr()
    again = prepare(DataConfig(**{**cfg_for(tmp_path, src).__dict__, "cache_dir": str(tmp_path / "c2")}), 8)
    assert again.directory == two and "tokenizing" not in capsys.readouterr().err  # one process reuses it


NODES_DRIVER = """
import os, sys
os.environ["LOCAL_RANK"] = "0"  # each process plays the first process of its own node
from gpt.commands.prepare import run
run([sys.argv[1], "data.tokenizer=char", f"data.cache_dir={sys.argv[2]}/node{os.environ['RANK']}"])
"""


@pytest.mark.slow
def test_nodes_without_a_shared_cache_dir_each_prepare_their_own_copy(tmp_path, docs):
    write_parquet(tmp_path / "a.parquet", docs, rows_per_group=20)
    driver = tmp_path / "driver.py"
    driver.write_text(NODES_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    p = subprocess.run(
        cmd + [str(tmp_path / "a.parquet"), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (one,), (two,) = (list((tmp_path / f"node{r}").iterdir()) for r in (0, 1))
    assert one.name == two.name and sorted(f.name for f in one.iterdir()) == sorted(
        f.name for f in two.iterdir()
    )
    for f in one.iterdir():
        assert f.name == "meta.json" or f.read_bytes() == (two / f.name).read_bytes(), f.name
