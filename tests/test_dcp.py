"""Sharded checkpoints (train.checkpoint_format, gpt.dcp, gpt.train.sharded): each rank writes its
shards with torch.distributed.checkpoint; any world size resumes them, each rank reading the slices
of its own shards (gpt.train.sharded.load_sharded); a partial or damaged one is one CheckpointError
and the previous checkpoint is used; the one loader reads them whole.

The multi-process test launches gloo ranks on this CPU with torchrun: world sizes 4 -> 2 -> 1 (8 ranks
on 2 shared cores would take minutes); the 2-rank FSDP2 run through train.py is in
tests/test_distributed.py (train.checkpoint_format=auto is sharded there)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt import dcp
from gpt.checkpoint import history, load_checkpoint, load_latest
from gpt.config import TrainRunConfig
from gpt.errors import CheckpointError
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.train.loop import train
from gpt.typed_config import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def tiny(out: Path, corpus: Path, cache: Path, **train_kw) -> TrainRunConfig:
    model = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
    data = dict(name="small", path=str(corpus), tokenizer="char", cache_dir=str(cache), num_workers=1)
    steps = dict(max_steps=4, ckpt_interval=2, eval_interval=2, eval_steps=1, keep_last=2, progress=False,
                 peak_flops=1e12, dtype="fp32", batch_size=8)  # fmt: skip
    return TrainRunConfig.from_dict({"out_dir": str(out), "seed": 7, "device": "cpu", "model": model,
                                     "data": data, "train": {**steps, **train_kw},
                                     "wandb": {"mode": "disabled"}})  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict[str, Path]:
    """One process, fp32, 4 steps saved every 2: as one file, sharded, and the sharded run resumed
    from its step-2 checkpoint to 4."""
    tmp = tmp_path_factory.mktemp("dcp")
    cache = tmp / "cache"
    train(tiny(tmp / "single", corpus, cache, checkpoint_format="single"))
    train(tiny(tmp / "sharded", corpus, cache, checkpoint_format="sharded"))
    shutil.copytree(tmp / "sharded", tmp / "resumed")  # stopped at step 2: its step-4 checkpoint removed
    shutil.rmtree(tmp / "resumed" / "ckpt-0000004.dcp")
    cfg = tiny(tmp / "resumed", corpus, cache, checkpoint_format="sharded")
    cfg.resume = True
    train(cfg)
    return {name: tmp / name for name in ("single", "sharded", "resumed")}


def same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_sharded_run_equals_the_file_run_and_resumes_bit_for_bit(runs):
    single, sharded, resumed = (load_checkpoint(runs[k]) for k in ("single", "sharded", "resumed"))
    assert sharded["step"] == resumed["step"] == 4
    same_tensors(sharded["model"], single["model"])
    same_tensors(resumed["model"], single["model"])
    for name, state in single["optimizer"]["state"].items():
        same_tensors(resumed["optimizer"]["state"][name], state)
    # keep_last=2: the two newest directories, each complete with its manifest, no leftovers
    names = sorted(p.name for p in runs["sharded"].iterdir() if "ckpt" in p.name)
    assert names == ["ckpt-0000002.dcp", "ckpt-0000004.dcp"]
    manifest = json.loads((runs["sharded"] / "ckpt-0000004.dcp" / dcp.MANIFEST).read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 1 and dcp.META in manifest["files"]


def test_the_one_loader_reads_a_sharded_run_like_a_file(runs):
    a, b = load(runs["sharded"]), load(runs["single"])  # what sample.py, eval, serve and export do
    assert a.source.endswith("ckpt-0000004.dcp") and a.tokenizer.to_state() == b.tokenizer.to_state()
    idx = torch.tensor([a.tokenizer.encode("ROMEO:")])
    assert torch.equal(a.build()(idx)[0], b.build()(idx)[0])
    assert load(runs["sharded"] / "ckpt-0000002.dcp").state["step"] == 2  # a directory given directly


def test_a_sharded_run_rolls_back_to_its_directory_and_saves_that_step_again(corpus, tmp_path):
    """NaN gradients at steps 3 and 4 (max_bad_steps=2, both skipped): back to the newest directory,
    ckpt-0000004.dcp, read whole and saved again in place at once (the same step: the old one moved
    aside, the new one renamed in); the run finishes with finite sharded checkpoints and no leftovers."""
    left = [2]

    def poison(step: int, model: torch.nn.Module) -> None:
        if step in (3, 4) and left[0] > 0:
            left[0] -= 1
            next(model.parameters()).grad.fill_(float("nan"))

    cfg = tiny(tmp_path / "run", corpus, tmp_path / "cache", checkpoint_format="sharded", max_steps=6,
               max_bad_steps=2)  # fmt: skip
    assert train(cfg, after_backward=poison)["step"] == 6
    assert [p.name for p in history(cfg.out_dir)] == ["ckpt-0000006.dcp", "ckpt-0000004.dcp"]
    assert not [p for p in Path(cfg.out_dir).iterdir() if p.name.endswith((".tmp", ".old"))]
    for path in history(cfg.out_dir):
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values())
    rollbacks = [r for r in read_metrics(cfg.out_dir, events=True) if r.get("event") == "rollback"]
    assert [(r["step"], r["from_step"]) for r in rollbacks] == [(4, 4)]


def test_an_async_sharded_run_saves_the_same_checkpoints(runs, corpus, tmp_path):
    """train.async_checkpoint=true: written by a thread while training goes on, published (manifest,
    rename, keep_last) before the next save and at the end: the same checkpoints as saved in line."""
    cfg = tiny(tmp_path / "async", corpus, tmp_path / "cache", checkpoint_format="sharded",
               async_checkpoint=True)  # fmt: skip
    assert train(cfg)["step"] == 4
    assert [p.name for p in history(cfg.out_dir)] == ["ckpt-0000004.dcp", "ckpt-0000002.dcp"]
    assert not [p for p in Path(cfg.out_dir).iterdir() if p.name.endswith((".tmp", ".old"))]
    for name in ("ckpt-0000002.dcp", "ckpt-0000004.dcp"):
        a, b = load_checkpoint(Path(cfg.out_dir) / name), load_checkpoint(runs["sharded"] / name)
        same_tensors(a["model"], b["model"])
        for param, state in b["optimizer"]["state"].items():
            same_tensors(a["optimizer"]["state"][param], state)


def test_an_async_save_holds_the_weights_of_its_step_not_later_ones(tmp_path):
    """The shards are copied at the save: weights changed while the thread writes are not in it."""
    from gpt.checkpoint import checkpoint_state
    from gpt.model import GPT, GPTConfig
    from gpt.ranks import Ranks
    from gpt.tokenizer import CharTokenizer
    from gpt.train.sharded import SaveInFlight, save_sharded

    config = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, vocab_size=64)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = checkpoint_state({}, config, CharTokenizer(list("ab")).to_state(), step=1)
    pending = save_sharded(tmp_path, model, optimizer, meta, Ranks(), keep_last=2, background=True)
    assert isinstance(pending, SaveInFlight) and not (tmp_path / "ckpt-0000001.dcp").exists()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert pending.finish() == tmp_path / "ckpt-0000001.dcp"
    same_tensors(load_checkpoint(tmp_path / "ckpt-0000001.dcp")["model"], before)


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_a_damaged_shard_is_one_error_and_the_previous_checkpoint_is_used(runs, tmp_path):
    out = _copy(runs["sharded"], tmp_path)
    shard = out / "ckpt-0000004.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out / "ckpt-0000004.dcp")
    assert "__0_0.distcp does not match its checksum" in str(e.value) and "\n" not in str(e.value)
    warned: list[str] = []
    state, used = load_latest(out, warn=warned.append)
    assert used.name == "ckpt-0000002.dcp" and state["step"] == 2 and "damaged" in warned[0]


def test_resume_passes_over_a_damaged_newest_directory_and_loads_the_previous_into_the_model(
    runs, corpus, tmp_path, capsys
):
    """resume=true: the newest directory's shard is damaged, so the manifest check passes it over; the
    previous one is loaded into the model and optimizer (dcp.load) and the run ends where it would."""
    out = _copy(runs["sharded"], tmp_path)
    shard = out / "ckpt-0000004.dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"?")
    cfg = tiny(out, corpus, tmp_path / "cache", checkpoint_format="sharded")
    cfg.resume = True
    assert train(cfg)["step"] == 4
    printed = capsys.readouterr()
    assert "__0_0.distcp does not match its checksum" in printed.out + printed.err
    assert "resumed ckpt-0000002.dcp: this rank read" in printed.out
    same_tensors(load_checkpoint(out)["model"], load_checkpoint(runs["single"])["model"])


def test_a_save_cut_short_is_never_taken_as_a_checkpoint(runs, tmp_path):
    out = _copy(runs["sharded"], tmp_path)
    shutil.copytree(out / "ckpt-0000004.dcp", out / ".ckpt-0000006.dcp.tmp")  # ranks wrote, no rename
    (out / "ckpt-0000004.dcp" / dcp.MANIFEST).unlink()  # ... or a directory without its manifest
    assert [p.name for p in history(out)] == ["ckpt-0000004.dcp", "ckpt-0000002.dcp"]
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_checkpoint(out)
    assert load(out, warn=lambda _: None).state["step"] == 2  # resume takes the previous one


def test_sample_py_on_a_sharded_directory_without_manifest_is_one_line(runs, tmp_path, capsys):
    from gpt.commands.sample import sample_main

    out = _copy(runs["sharded"], tmp_path)
    (out / "ckpt-0000004.dcp" / dcp.MANIFEST).unlink()
    with pytest.raises(SystemExit) as e:
        sample_main([f"ckpt={out / 'ckpt-0000004.dcp'}", "prompt=RO", "max_new_tokens=2", "device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "has no manifest.json" in err, err
    sample_main([f"ckpt={out / 'ckpt-0000002.dcp'}", "prompt=RO", "max_new_tokens=2", "device=cpu"])


def test_a_forged_metadata_pickle_is_refused_without_running_it(runs, tmp_path):
    out = _copy(runs["sharded"], tmp_path)
    ckpt = out / "ckpt-0000004.dcp"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((ckpt / dcp.MANIFEST).read_text())  # a manifest forged to match
    manifest["files"][".metadata"] = dcp.file_digest(ckpt / ".metadata")
    (ckpt / dcp.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------ gloo ranks: 4 -> 2 -> 1
DRIVER = """
import json
import os
import sys
from pathlib import Path
import torch
from gpt import dcp
from gpt.checkpoint import checkpoint_state, load_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import CharTokenizer
from gpt.train import distributed as D
from gpt.train.sharded import checkpoint_group, load_sharded, resume_point, save_sharded

TOK = CharTokenizer(list("abc")).to_state()
out, steps, src = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
info = D.init_distributed("cpu")
config = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=64)
torch.manual_seed(0)
model = D.wrap_model(GPT(config), info, "fsdp", None)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
step = 0
if src:  # resume as train.py does (a run directory: its newest good checkpoint, verified by all ranks
    # together), then each rank reads the slices of its own shards
    path = Path(src) if src.endswith(".dcp") else Path(resume_point(Path(src), print, info).source)
    dcp.verify(path)
    read = load_sharded(path, model, optimizer)
    step = load_checkpoint(path / dcp.META)["step"]
    (out.parent / f"read-{out.name}-{info.rank}.json").write_text(json.dumps({**read, "from step": step}))
per = 8 // info.world_size
ASYNC, pending = os.environ.get("ASYNC_CHECKPOINT") == "1", None
group = checkpoint_group(info) if ASYNC else None


def save(step, pending):  # train.async_checkpoint: the previous background save is published first
    if ASYNC and pending is not None:
        pending.finish()
    meta = checkpoint_state({}, config, TOK, step=step)
    return save_sharded(out, model, optimizer, meta, info, keep_last=10, background=ASYNC, group=group)


while step < steps:
    step += 1
    x = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(step))
    x = x[info.rank * per : (info.rank + 1) * per]
    model(x[:, :-1], x[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 2 == 0 and step < steps:
        pending = save(step, pending)
save(step, pending).finish() if ASYNC else save(step, pending)
D.teardown()
"""


def launch(tmp: Path, world: int, *args: str, **env: str) -> None:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd = [*cmd, str(driver)] if world > 1 else [sys.executable, str(driver)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **env}
    p = subprocess.run([*cmd, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


@pytest.mark.slow
def test_four_ranks_reshard_to_two_and_one_bit_for_bit_and_each_rank_reads_its_shards(tmp_path):
    launch(tmp_path, 4, str(tmp_path / "w4"), "3")  # saves at steps 2 and 3
    launch(tmp_path, 2, str(tmp_path / "w2"), "2", str(tmp_path / "w4" / "ckpt-0000002.dcp"))  # no step
    launch(tmp_path, 1, str(tmp_path / "w1"), "2", str(tmp_path / "w2" / "ckpt-0000002.dcp"))
    saved = {w: load_checkpoint(tmp_path / f"w{w}" / "ckpt-0000002.dcp") for w in (4, 2, 1)}
    for w in (2, 1):  # resharded and saved again: the same tensors, model and optimizer
        same_tensors(saved[w]["model"], saved[4]["model"])
        for name, state in saved[4]["optimizer"]["state"].items():
            same_tensors(saved[w]["optimizer"]["state"][name], state)
    manifest = lambda w: json.loads((tmp_path / f"w{w}" / "ckpt-0000002.dcp" / dcp.MANIFEST).read_text())
    worlds = {w: manifest(w)["world_size"] for w in (4, 2, 1)}
    assert worlds == {4: 4, 2: 2, 1: 1}
    assert len(list((tmp_path / "w4" / "ckpt-0000002.dcp").glob("__*_*.distcp"))) == 4  # one per rank
    # 4 ranks resumed at step 2 take step 3 exactly as the uninterrupted 4-rank run
    launch(tmp_path, 4, str(tmp_path / "w4r"), "3", str(tmp_path / "w4" / "ckpt-0000002.dcp"))
    same_tensors(load_checkpoint(tmp_path / "w4r")["model"], load_checkpoint(tmp_path / "w4")["model"])
    # what each rank read on resume (bytes per file, counted by the reader over the slices DCP read)
    size = {w: {p.name: p.stat().st_size for p in (tmp_path / f"w{w}" / "ckpt-0000002.dcp").glob("*.distcp")}
            for w in (4, 2)}  # fmt: skip
    read = lambda run, r: {k: v for k, v in json.loads((tmp_path / f"read-{run}-{r}.json").read_text())
                           .items() if k != "from step"}  # fmt: skip
    total = sum(size[4].values())
    for r in range(4):  # the same world: rank r reads its own file whole, of the others the few
        own, got = f"__{r}_0.distcp", read("w4r", r)  # replicated entries (AdamW's step counts, ...)
        assert got[own] == size[4][own] and sum(got.values()) - got[own] < 0.1 * total, got
    for r in range(2):  # half the ranks: about half of the bytes each, never the whole checkpoint
        assert sum(read("w2", r).values()) < 0.6 * total, read("w2", r)
    assert sum(read("w1", 0).values()) == sum(size[2].values())  # one process reads all of it
    # train.async_checkpoint on 4 gloo ranks (DCP's writing thread on a group of its own): the same
    # checkpoints as saved in line, each published once written
    launch(tmp_path, 4, str(tmp_path / "w4a"), "3", ASYNC_CHECKPOINT="1")
    for name in ("ckpt-0000002.dcp", "ckpt-0000003.dcp"):
        a, b = load_checkpoint(tmp_path / "w4a" / name), load_checkpoint(tmp_path / "w4" / name)
        same_tensors(a["model"], b["model"])
        for param, state in b["optimizer"]["state"].items():
            same_tensors(a["optimizer"]["state"][param], state)
    # a damaged shard of the newest checkpoint, hashed by rank 1 of 2 alone (the ranks share the
    # hashing): both ranks pass over it to step 2 and take step 3 as the uninterrupted run
    shutil.copytree(tmp_path / "w4", tmp_path / "w4d")
    shard = tmp_path / "w4d" / "ckpt-0000003.dcp" / "__2_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"?")
    launch(tmp_path, 2, str(tmp_path / "w2d"), "3", str(tmp_path / "w4d"))
    assert [json.loads((tmp_path / f"read-w2d-{r}.json").read_text())["from step"] for r in (0, 1)] == [2, 2]
    resumed, uninterrupted = (load_checkpoint(tmp_path / w)["model"] for w in ("w2d", "w4"))
    for name, t in uninterrupted.items():  # 2 ranks sum the gradients in another order than 4
        torch.testing.assert_close(resumed[name], t, rtol=1e-5, atol=1e-6)
