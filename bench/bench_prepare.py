"""Data preparation benchmark: ``gpt prepare`` on a ~200 MB corpus with 1 and 2 processes
(``torchrun``), against the raw tokenizer's own throughput on the same text.

    python bench/bench_prepare.py              # 200 MB of Parquet, GPT-2 tokenizer, 1 and 2 processes
    python bench/bench_prepare.py --mb 64 --procs 1 2 4 --format jsonl.zst --json results.jsonl

The corpus is made by the script in a temp folder (deleted afterwards): documents of 20-60 lines
drawn from Tiny Shakespeare (shipped in data/), written as files of about 25 MB (Parquet row groups
of 1,000 documents; or .jsonl / .jsonl.zst). Each process count prepares it into a fresh cache with
``data.num_workers`` tokenizer processes per rank (default 1: N ranks use N cores). Reported:
- MB/s and tokens/s: the corpus's file bytes and its tokens over the slowest rank's preparation time
  (from the call of the command's job to its return; process and torchrun start-up excluded, shown
  apart as wall seconds);
- peak RSS per process (MB): ``ru_maxrss`` of each rank (and of its tokenizer workers, if any);
- reference: one ``encode_ordinary_batch`` call per 1,024 documents of the same text with tiktoken
  (its own thread pool), in this process, after reading the documents back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without install

from gpt.data.corpus import iter_documents
from gpt.tokenizer_load import gpt2_tokenizer
from gpt.typed_config import REPO_ROOT

DRIVER = """
import json, os, resource, sys, time
from gpt.commands.prepare import run
t0 = time.perf_counter()
run(sys.argv[2:])
seconds = time.perf_counter() - t0
usage = lambda who: resource.getrusage(who).ru_maxrss / 1024  # kB -> MB on Linux
out = {"rank": int(os.environ.get("RANK", 0)), "seconds": seconds,
       "rss_mb": usage(resource.RUSAGE_SELF), "workers_rss_mb": usage(resource.RUSAGE_CHILDREN)}
open(os.path.join(sys.argv[1], f"rank{out['rank']}.json"), "w").write(json.dumps(out))
"""


def make_corpus(folder: Path, mb: int, fmt: str, seed: int = 0) -> int:
    """Write about ``mb`` MB of documents into ``folder``; returns the bytes written."""
    lines = (REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_text().splitlines()
    rng, target, total, index = random.Random(seed), mb << 20, 0, 0
    while total < target:
        docs, size = [], 0
        while size < min(25 << 20, target - total) and size < 25 << 20:
            start = rng.randrange(len(lines) - 60)
            docs.append("\n".join(lines[start : start + rng.randint(20, 60)]))
            size += len(docs[-1]) + 1
        path = folder / f"part-{index:05d}.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)
        else:
            raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
            if fmt == "jsonl.zst":
                import zstandard

                raw = zstandard.ZstdCompressor().compress(raw)
            path.write_bytes(raw)
        total, index = total + path.stat().st_size, index + 1
    return total


def reference(folder: Path) -> tuple[float, int, float]:
    """(seconds, tokens, text MB) of the raw tiktoken batch calls on the corpus's documents."""
    enc, docs, seconds, tokens, nbytes = gpt2_tokenizer()._enc, [], 0.0, 0, 0

    def flush() -> None:
        nonlocal seconds, tokens
        t0 = time.perf_counter()
        tokens += sum(len(ids) for ids in enc.encode_ordinary_batch(docs))
        seconds += time.perf_counter() - t0
        docs.clear()

    for doc in iter_documents(folder):
        docs.append(doc)
        nbytes += len(doc.encode())
        if len(docs) == 1024:
            flush()
    flush()
    return seconds, tokens, nbytes / 1e6


def prepare_with(nproc: int, folder: Path, work: Path, workers: int) -> dict:
    """Run the preparation with ``nproc`` processes; its figures."""
    out, cache = work / f"ranks-{nproc}", work / f"cache-{nproc}"
    out.mkdir()
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    launcher = [sys.executable] if nproc == 1 else torchrun
    args = [str(driver), str(out), str(folder), "data.tokenizer=gpt2", f"data.cache_dir={cache}",
            f"data.num_workers={workers}", "data.val_fraction=0.01"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run(launcher + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"preparation with {nproc} process(es) failed:\n{p.stdout}{p.stderr}")
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    (meta_file,) = cache.glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    return {
        "procs": nproc,
        "seconds": max(r["seconds"] for r in ranks),
        "wall_seconds": wall,
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "shards": len(meta["train_shards"]) + len(meta["val_shards"]),
        "rss_mb": [round(r["rss_mb"]) for r in ranks],
        "workers_rss_mb": [round(r["workers_rss_mb"]) for r in ranks],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB (file bytes)")
    ap.add_argument("--format", default="parquet", choices=["parquet", "jsonl", "jsonl.zst"])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to run")
    ap.add_argument("--workers", type=int, default=1, help="data.num_workers per process")
    ap.add_argument("--json", help="append the results as JSON lines to this file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare-"))
    try:
        folder = work / "corpus"
        folder.mkdir()
        size = make_corpus(folder, args.mb, args.format)
        print(f"corpus: {size / 1e6:.1f} MB of .{args.format} in {len(list(folder.iterdir()))} files; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
        rows = []
        for n in args.procs:
            r = prepare_with(n, folder, work, args.workers)
            r.update(format=args.format, mb=size / 1e6, mb_s=size / 1e6 / r["seconds"],
                     tokens_s=r["tokens"] / r["seconds"])  # fmt: skip
            rows.append(r)
            print(f"{n} process(es): {r['mb_s']:.1f} MB/s, {r['tokens_s'] / 1e6:.2f}M tokens/s "
                  f"({r['tokens']:,} tokens in {r['shards']} shards, {r['seconds']:.1f} s; wall "
                  f"{r['wall_seconds']:.1f} s), peak RSS per process {r['rss_mb']} MB")  # fmt: skip
        seconds, tokens, text_mb = reference(folder)
        rows.append({"procs": "tiktoken", "format": args.format, "seconds": seconds, "tokens": tokens,
                     "mb_s": text_mb / seconds, "tokens_s": tokens / seconds})  # fmt: skip
        print(f"raw tokenizer (tiktoken encode_ordinary_batch, this process): {text_mb / seconds:.1f} MB/s "
              f"of text, {tokens / seconds / 1e6:.2f}M tokens/s ({tokens:,} tokens)")  # fmt: skip
        if args.json:
            with open(args.json, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
