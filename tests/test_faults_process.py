"""Faults around a long run, each tried for real: two runs on one directory, a crash after
overwrite=true, stray temp files, kills at random moments (``slow``), NaN on one rank of two and ranks
that disagree (``slow``), a poisoned data cache, a dying tokenizer worker, signals during data
preparation and evals, a full disk. Inside the run (the guard, checkpoints, metrics, exact resume):
test_faults.py. docs/faults.md lists them.

    pytest tests/test_faults_process.py -m "not slow"     # the fast subset (CI)
    pytest tests/test_faults_process.py                   # with the kill and multi-process tests
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_faults import assert_finite_checkpoints, weights

from gpt.checkpoint import history, load_checkpoint, save_checkpoint
from gpt.data.prepare import check_token_ids, prepare
from gpt.errors import CheckpointError, ConfigError
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.train.rundir import RunLock
from gpt.train.signals import Stop
from gpt.typed_config import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ 8-9, 15. the run directory


def test_a_second_run_on_a_locked_directory_is_refused_and_a_stale_lock_is_taken(make_cfg, tmp_path):
    cfg = make_cfg(train=dict(max_steps=2, eval_interval=0))
    held = f"in use by another run \\(pid {os.getpid()} on"
    with RunLock(cfg.out_dir), pytest.raises(ConfigError, match=held):
        train(cfg)
    # a lock that made out_dir and was released with nothing else written leaves nothing behind
    assert not (tmp_path / "run").exists()
    # a lock file left by a killed run (nobody holds the flock): taken over
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    assert train(cfg)["step"] == 2


def test_overwrite_then_a_crash_leaves_nothing_to_resume(make_cfg, tmp_path):
    train(make_cfg(train=dict(max_steps=3, eval_interval=0)))
    (tmp_path / "run" / "notes.txt").write_text("mine")

    def crash(step, model):
        raise RuntimeError("crash before the first save")

    fresh = make_cfg(overwrite=True, seed=9, train=dict(max_steps=3, eval_interval=0, max_rollbacks=0))
    with pytest.raises(RuntimeError, match="crash"):
        train(fresh, after_backward=crash)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(make_cfg(resume=True, seed=9, train=dict(max_steps=3, eval_interval=0)))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own files went


def test_stray_temp_files_are_removed_at_the_next_start(make_cfg, tmp_path):
    cfg = make_cfg(train=dict(max_steps=2, eval_interval=0))
    train(cfg)
    out = tmp_path / "run"
    for name in (".ckpt.pt.x1y2.tmp", ".tokenizer.json.ab.tmp"):
        (out / name).write_bytes(b"half a file")
    (out / ".replaced-20260101T000000-1").mkdir()
    from gpt.data.prepare import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: a preparation killed with SIGKILL
    killed = tmp_path / "cache" / f".tmp-small-0123456789abcdef-{_HOST}-{dead.pid}"
    live = tmp_path / "cache" / f".tmp-small-0123456789abcdef-{_HOST}-{os.getpid()}"
    elsewhere = tmp_path / "cache" / f".tmp-small-0123456789abcdef-otherhost-{dead.pid}"
    for d in (killed, live, elsewhere):
        d.mkdir()
    train(make_cfg(resume=True, train=dict(max_steps=4, eval_interval=0)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]
    assert not killed.exists() and live.exists() and elsewhere.exists()


# ------------------------------------------------------------------------- kills, several ranks

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from gpt.checkpoint import history
from gpt.config import TrainRunConfig
from gpt.train.loop import train
d = json.loads(open(sys.argv[1]).read())
d["resume"] = bool(history(d["out_dir"]))  # killed before the first checkpoint: start again
d["overwrite"] = not d["resume"]
train(TrainRunConfig.from_dict(d))
"""


def _wait_for_training(p) -> bool:
    """Until the child trains (its first eval or step line); False if it ended first (a resumed
    run that had already finished)."""
    while not (line := p.stdout.readline()).startswith((b"step ", b"eval step")):
        if not line:
            return False
    return True


def _start(script, cfg_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), str(cfg_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


@pytest.mark.slow
@pytest.mark.parametrize("kills", [1, 20])
def test_sigkill_at_random_moments_then_resume_gives_the_uninterruptedweights(make_cfg, tmp_path, kills):
    kw = dict(
        model=dict(dropout=0.1),
        train=dict(
            max_steps=60, eval_interval=5, eval_steps=4, ckpt_interval=3, log_interval=1, peak_flops=None
        ),
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ref = make_cfg("ref", **kw)
    (tmp_path / "ref.json").write_text(json.dumps(ref.to_dict()))
    p = _start(script, tmp_path / "ref.json")
    assert _wait_for_training(p)
    t0 = time.monotonic()
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    duration = time.monotonic() - t0  # of the training itself (the machine may be busy: measured)
    want = weights(ref.out_dir)
    rng, done, reached, finished = random.Random(kills), 0, set(), []
    while done < kills:  # killed runs, each resumed until it finishes, until `kills` kills landed
        run = make_cfg(f"killed{len(finished)}", **kw)
        cfg_file = tmp_path / f"{Path(run.out_dir).name}.json"
        cfg_file.write_text(json.dumps(run.to_dict()))
        while True:
            p = _start(script, cfg_file)
            if _wait_for_training(p) and done < kills:
                # a random moment of a step, an eval or a save
                time.sleep(rng.uniform(0.0, duration / 8))
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    done += 1
                    reached.add(load_checkpoint(run.out_dir)["step"] if history(run.out_dir) else -1)
                    continue
            assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
            if load_checkpoint(run.out_dir)["step"] == 60:
                break
        finished.append(run.out_dir)
    assert kills < 20 or len(reached) >= 5, reached  # the kills landed all along the runs
    for out_dir in finished:
        got = weights(out_dir)
        assert all(torch.equal(want[k], got[k]) for k in want), out_dir
        leftovers = [p.name for p in Path(out_dir).iterdir() if p.name.startswith(".") and p.name != ".lock"]
        assert leftovers == []
    assert not list((tmp_path / "cache").glob(".tmp-*"))


DRIVER = """
import json, os, sys
import torch
from gpt.config import TrainRunConfig
from gpt.train.loop import train
d = json.loads(open(sys.argv[1]).read())
rank, sums = os.environ["RANK"], []

def hook(step, model):
    sums.append([step, sum(float(p.detach().double().sum()) for p in model.parameters())])
    if rank == "1" and step == 2:
        next(model.parameters()).grad.fill_(float("nan"))

train(TrainRunConfig.from_dict(d), after_backward=hook)
open(os.path.join(d["out_dir"], f"sums{rank}.json"), "w").write(json.dumps(sums))
"""


def run_two_ranks(tmp_path, cfg, driver: str = DRIVER) -> subprocess.CompletedProcess:
    """``driver`` run on 2 ranks by torchrun with ``cfg`` (written to tmp_path), output captured."""
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "driver.py").write_text(driver)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run([*cmd, str(tmp_path / "driver.py"), str(tmp_path / "cfg.json")], env=env,
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.slow
def test_nan_on_one_of_two_ranks_is_skipped_by_both(make_cfg, tmp_path):
    cfg = make_cfg(train=dict(max_steps=5, eval_interval=0, ckpt_interval=0))
    p = run_two_ranks(tmp_path, cfg)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    events = [r for r in read_metrics(cfg.out_dir, events=True) if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("skipped", 2)]  # rank 0 saw no NaN itself
    sums = [json.loads((Path(cfg.out_dir) / f"sums{r}.json").read_text()) for r in (0, 1)]
    assert sums[0] == sums[1]  # the same weights at every step: both skipped step 2
    assert sums[0][2][1] == sums[0][3][1]  # step 2 changed nothing
    assert_finite_checkpoints(cfg.out_dir)


# ------------------------------------------------------------------------ 10, 16. data and tokenizer


def test_the_data_cache_keys_on_content_and_shard_size_and_rebuilds_a_poisoned_entry(
    make_cfg, tmp_path, corpus, capsys
):
    text = tmp_path / "corpus.txt"
    text.write_bytes(corpus.read_bytes())
    cfg = make_cfg(data=dict(path=str(text))).data
    first = prepare(cfg, 32, show_progress=False)
    stat = text.stat()
    data = bytearray(text.read_bytes())
    data[100] = ord("Z") if data[100] != ord("Z") else ord("Y")  # same size ...
    text.write_bytes(bytes(data))
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same mtime
    edited = prepare(cfg, 32, show_progress=False)
    assert edited.directory != first.directory
    smaller = prepare(make_cfg(data=dict(path=str(text), shard_tokens=10_000)).data, 32, show_progress=False)
    assert smaller.directory != edited.directory and len(smaller.train_shards) > 1
    # poison one token id of the cached shards: found on open, the entry is rebuilt
    shard = edited.train_shards[0]
    raw = bytearray(shard.read_bytes())
    raw[1024 + 10 : 1024 + 12] = (60_000).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    again = prepare(cfg, 32, show_progress=False)
    err = capsys.readouterr().err
    assert "token id 60000" in err and "rebuilding" in err
    assert again.directory == edited.directory and check_token_ids(again) is None


def test_a_lone_surrogate_in_a_jsonl_document_saves_the_char_tokenizer(make_cfg, tmp_path):
    docs = tmp_path / "docs.jsonl"
    line = json.dumps({"text": "To be, or not to be \ud800 that is the question. " * 30})
    docs.write_text("\n".join([line] * 40) + "\n")
    cfg = make_cfg(data=dict(path=str(docs)), train=dict(max_steps=2, eval_interval=0))
    train(cfg)
    from gpt.tokenizer_load import load_tokenizer

    tok = load_tokenizer(Path(cfg.out_dir) / "tokenizer.json")
    assert tok.decode(tok.encode("be \ud800 that")) == "be \ud800 that"


@pytest.mark.slow
def test_ranks_with_different_settings_are_refused_at_start(make_cfg, tmp_path):
    cfg = make_cfg(train=dict(max_steps=2, eval_interval=0))
    driver = DRIVER.replace(
        "d = json.loads(open(sys.argv[1]).read())",
        "d = json.loads(open(sys.argv[1]).read())\nd['seed'] += int(os.environ['RANK'])",
    )
    p = run_two_ranks(tmp_path, cfg, driver)
    assert p.returncode != 0 and "ranks [1] have other data, tokenizer or settings" in p.stdout + p.stderr


# ------------------------------------------------------------------- 14. impractical shapes, evals


def test_an_impractical_block_size_is_refused_before_the_first_step(make_cfg):
    """With dropout the math attention keeps the (T, T) scores for the backward: 40,000 tokens cannot fit."""
    cfg = make_cfg(model=dict(block_size=40_000, dropout=0.1), data=dict(val_fraction=0.0),
                   train=dict(max_steps=2))  # fmt: skip
    with pytest.raises(ConfigError, match="model.block_size=40000 .* GiB per training step.*GiB free"):
        train(cfg)


def test_sigterm_during_a_long_eval_stops_at_once_with_a_checkpoint(make_cfg):
    import signal
    import threading

    train(make_cfg(train=dict(max_steps=2, eval_interval=0)))
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    long_evals = make_cfg(resume=True, train=dict(max_steps=50, eval_interval=3, eval_steps=1_000_000))
    try:
        # the signal comes during the eval at step 3 (of hours)
        summary = train(long_evals, should_stop=lambda step: step == 3 and timer.start())
    finally:
        timer.cancel()
    assert summary["stopped"] is Stop.SIGTERM and summary["step"] == 3
    assert load_checkpoint(long_evals.out_dir)["step"] == 3  # the eval was abandoned, the step saved
    assert read_metrics(long_evals.out_dir) == []


def test_a_full_disk_is_one_line_naming_the_path(tmp_path):
    from gpt.errors import DiskFullError

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(DiskFullError, match=f"no space left on the device writing {small}/ckpt.pt"):
            save_checkpoint(small / "ckpt.pt", {"model": {"w": torch.zeros(1_000_000)}})
        assert list(small.iterdir()) == []  # no temp file left behind
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# -------------------------------------------------------------- 11. tokenizer workers, Ctrl-C


@pytest.mark.slow
def test_a_tokenizer_worker_that_dies_fails_the_preparation_instead_of_hanging(make_cfg, tmp_path, corpus):
    from gpt.errors import DataError
    from gpt.tokenizer import char_tokenizer

    text = corpus.read_text()
    big = tmp_path / "big.txt"
    big.write_text(text * 60 + "POISON\n" + text * 10)  # over the size tokenized by workers
    tok, parent = char_tokenizer([text]), os.getpid()

    class DiesInAWorker(type(tok)):  # a real tokenizer whose worker process dies on one chunk
        def encode_batch(self, texts):
            if os.getpid() != parent and any("POISON" in t for t in texts):
                os._exit(1)
            return super().encode_batch(texts)

    tok.__class__ = DiesInAWorker
    cfg = make_cfg(data=dict(path=str(big), num_workers=2)).data
    with pytest.raises(DataError, match="worker process died"):
        prepare(cfg, 32, tokenizer=tok, show_progress=False)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_data_preparation_stops_it_at_once_and_cleanly(make_cfg, tmp_path, corpus, sig):
    import signal

    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text() * 400)  # 24 MB: tokenizing takes a while
    cfg = make_cfg(data=dict(path=str(big), num_workers=2))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    script = "import json, sys\nfrom gpt.config import TrainRunConfig\nfrom gpt.train.loop import train\n"
    script += "from gpt.commands.train import EXIT_STATUS\n"
    script += "summary = train(TrainRunConfig.from_dict(json.loads(open(sys.argv[1]).read())))\n"
    script += "sys.exit(EXIT_STATUS[summary['stopped']])\n"  # what the command does
    (tmp_path / "run.py").write_text(script)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    p = subprocess.Popen(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.json")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    seen = b""
    while b"tokenizing" not in seen:
        chunk = p.stderr.read1(4096)
        assert chunk, "the run ended before tokenizing"
        seen += chunk
    time.sleep(1.0)
    os.killpg(p.pid, getattr(signal, sig))  # as a terminal's Ctrl-C: the whole process group
    rc = p.wait(timeout=60)  # before: a deadlock in the pool's shutdown, or the whole preparation
    err = (seen + p.stderr.read()).decode()
    assert rc == (130 if sig == "SIGINT" else 143), err[-2000:]
    assert "Traceback" not in err and "nothing to save" in err
    assert not list((tmp_path / "cache").glob(".tmp-*"))


@pytest.mark.slow
def test_a_data_preparation_longer_than_the_collective_timeout_does_not_fail_the_job(
    make_cfg, tmp_path, corpus
):
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text() * 400)  # 24 MB: BPE training and tokenizing take seconds on rank 0
    data = dict(path=str(big), num_workers=1, tokenizer="bpe", vocab_size=1024)
    cfg = make_cfg(data=data, train=dict(max_steps=2, eval_interval=0, timeout_s=1))
    t0 = time.monotonic()
    p = run_two_ranks(tmp_path, cfg)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert time.monotonic() - t0 > 2  # the preparation did outlast the 2 s collective timeout
    assert load_checkpoint(cfg.out_dir)["step"] == 2
