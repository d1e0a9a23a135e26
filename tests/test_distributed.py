"""Multi-process training on the CPU: 2 gloo processes launched by torchrun against one process.

Every run is the same tiny command (Hydra overrides of train.py, eval at every step so that each
step's loss is recorded); the 2-rank runs are launched once per module and shared by the tests:

- ddp:        ``torchrun --standalone --nproc_per_node=2 train.py ...``, uninterrupted;
- ddp_crash:  DDP with gradient accumulation; rank 1 raises after step 3 (checkpoint at step 2);
- fsdp_stop:  FSDP2 + accumulation + activation checkpointing; rank 1 alone asks to stop at step 2;
- fsdp_slurm: resumes fsdp_stop with FSDP2 through scripts/slurm_train.sh on two "nodes" of this
              machine (srun and scontrol stand-ins), i.e. torchrun's multi-node c10d rendezvous.

    pytest tests/test_distributed.py
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_checkpoint
from gpt.commands.cli import compose_config
from gpt.commands.train import EXIT_STATUS, TRAIN
from gpt.config import TrainRunConfig
from gpt.data.prepare import prepare
from gpt.data.shards import TokenWindows
from gpt.errors import ConfigError
from gpt.ranks import Ranks
from gpt.runs.load import load
from gpt.runs.metrics import read_metrics
from gpt.train import distributed as D
from gpt.train.loop import split_batch, train
from gpt.typed_config import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
MAX_STEPS = 4

# train() under torchrun with a should_stop that acts on rank 1 only: "stop" asks to stop, "raise" fails
DRIVER = """
import json, os, sys
from gpt.config import TrainRunConfig
from gpt.train.loop import train

cfg, stop_at, action = json.loads(open(sys.argv[1]).read()), int(sys.argv[2]), sys.argv[3]

def should_stop(step):
    if os.environ["RANK"] == "1" and step == stop_at:
        if action == "raise":
            raise RuntimeError(f"injected failure on rank 1 at step {step}")
        return True
    return False

train(TrainRunConfig.from_dict(cfg), should_stop=should_stop)
"""
SRUN = """#!/bin/bash
# srun stand-in: the step's command once per node of the job, all on this machine
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def overrides(corpus: Path, cache: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny", "data=text", f"data.path={corpus}", "data.name=small", "data.tokenizer=char",
        f"data.cache_dir={cache}", "data.num_workers=1", "device=cpu", "seed=7", f"out_dir={out_dir}",
        "optim.lr=1e-2", "optim.warmup_steps=1", "optim.grad_clip=0.05",  # clipping active at every step
        f"train.max_steps={MAX_STEPS}", "train.batch_size=8", "train.eval_interval=1", "train.eval_steps=1",
        "train.log_interval=1", "train.ckpt_interval=2", "train.progress=false", "train.peak_flops=1e12",
        "train.timeout_s=300", "wandb.mode=disabled",
        "train.dtype=fp32",  # exact agreement is a property of fp32: bf16 rounding depends on the split
        *extra,
    ]  # fmt: skip


def compose(args: list[str]) -> TrainRunConfig:
    """The config train.py builds from these overrides."""
    return TrainRunConfig.from_dict(compose_config(TRAIN, args)[0])


def launch(cmd: list[str], env_extra: dict | None = None, timeout: float = 240) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def run_driver(tmp: Path, args: list[str], stop_at: int, action: str) -> tuple[int, str, float]:
    cfg_file = tmp / f"config-{stop_at}-{action}.json"
    cfg_file.write_text(json.dumps(compose(args).to_dict()))
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    return launch(torchrun(str(driver), str(cfg_file), str(stop_at), action))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_losses(got: list[dict], want: list[dict], steps: list[int], rel: float = 1e-5) -> None:
    by_step = {r["step"]: r for r in want}
    got_steps = {r["step"]: r for r in got}
    assert steps and set(steps) <= set(got_steps), (steps, sorted(got_steps))
    for s in steps:
        for key in ("train_loss", "val_loss"):
            want_value = by_step[s][key]
            assert got_steps[s][key] == pytest.approx(want_value, rel=rel), (s, key, got_steps[s], by_step[s])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict:
    """The reference 1-process run (in this process; it also prepares the shared data cache) and
    the 2-rank launches, each as (return code, output, seconds)."""
    tmp = tmp_path_factory.mktemp("dist")
    cache = tmp / "cache"
    args = lambda name, *extra: overrides(corpus, cache, tmp / name, *extra)
    r = {"tmp": tmp, "args": args}
    with contextlib.redirect_stdout(io.StringIO()) as console:
        train(compose(args("ref")))
    r["ref"], r["ref_console"] = read_metrics(tmp / "ref"), console.getvalue()
    r["ddp"] = launch(torchrun("--log-dir", str(tmp / "logs"), "--redirects", "3", "train.py", *args("ddp")))
    r["ddp_crash"] = run_driver(tmp, args("ddp_crash", "train.micro_batch_size=2"), stop_at=3, action="raise")
    fsdp = ("train.parallel=fsdp", "train.micro_batch_size=2", "train.activation_checkpointing=true")
    r["fsdp_stop"] = run_driver(tmp, args("fsdp_stop", *fsdp), stop_at=2, action="stop")
    # the single-process resume below needs the step-2 checkpoint that the FSDP resume overwrites
    shutil.copytree(tmp / "fsdp_stop", tmp / "fsdp_to_one")
    slurm_env = {
        "PATH": f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "NPROC_PER_NODE": "1",
        "PYTHON": sys.executable, "RDZV_PORT": str(free_port()),
    }  # fmt: skip
    (tmp / "bin").mkdir()
    for name, text in (("srun", SRUN), ("scontrol", "#!/bin/bash\necho localhost\necho localhost\n")):
        (tmp / "bin" / name).write_text(text)
        (tmp / "bin" / name).chmod(0o755)
    script = str(REPO_ROOT / "scripts" / "slurm_train.sh")
    r["fsdp_slurm"] = launch(["bash", script, *args("fsdp_stop", *fsdp, "resume=true")], slurm_env)
    return r


def step_losses(console: str) -> list[float]:
    """The losses of the console's step lines (``step 3/4 | loss 4.0669 | ...``)."""
    return [float(x) for x in re.findall(r"^step +\d+/\d+ \| loss ([0-9.]+)", console, re.M)]


def test_two_ranks_give_the_losses_of_one_process_and_only_rank0_reports(runs):
    rc, out, _ = runs["ddp"]
    assert rc == 0, out[-3000:]
    tmp = runs["tmp"]
    records = read_metrics(tmp / "ddp")
    assert [r["step"] for r in records] == list(range(MAX_STEPS + 1))  # one writer: no duplicate lines
    assert_same_losses(records, runs["ref"], list(range(MAX_STEPS + 1)))
    logs = {p.parent.name: p.read_text() for p in (tmp / "logs").rglob("stdout.log")}
    assert set(logs) == {"0", "1"}, logs
    assert "eval step 4" in logs["0"] and "step      4/4 | loss" in logs["0"]
    assert "eval step" not in logs["1"] and "| loss" not in logs["1"] and "model:" not in logs["1"]
    # the console's step loss is the mean over both ranks, not rank 0's half of the batch
    assert step_losses(logs["0"]) == pytest.approx(step_losses(runs["ref_console"]), abs=2e-4)
    assert len(step_losses(logs["0"])) == MAX_STEPS


def test_gradient_accumulation_on_two_ranks_gives_the_same_losses(runs):
    _, out, _ = runs["ddp_crash"]
    records = read_metrics(runs["tmp"] / "ddp_crash")
    assert [r["step"] for r in records][:3] == [0, 1, 2], out[-3000:]
    assert_same_losses(records, runs["ref"], [0, 1, 2])


def test_a_failing_rank_fails_the_job_promptly_and_keeps_the_last_checkpoint(runs):
    rc, out, seconds = runs["ddp_crash"]
    assert rc != 0 and "injected failure on rank 1" in out, out[-3000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to fail (collective timeout 300 s)"
    assert load_checkpoint(runs["tmp"] / "ddp_crash")["step"] == 2


def test_two_rank_checkpoint_resumes_in_one_process_like_the_uninterrupted_run(runs):
    """The DDP job's step-2 checkpoint, resumed by one process with the same global batch, goes
    on with the losses of the uninterrupted 2-rank run."""
    tmp = runs["tmp"]
    train(compose(runs["args"]("ddp_crash", "resume=true")))
    resumed = read_metrics(tmp / "ddp_crash")
    assert [r["step"] for r in resumed] == list(range(MAX_STEPS + 1))
    assert_same_losses(resumed, read_metrics(tmp / "ddp"), [3, 4])


def test_fsdp_ranks_stop_together_and_match_one_process(runs):
    rc, out, _ = runs["fsdp_stop"]
    assert rc == 0, out[-3000:]
    assert "stopped at step 2" in out
    state = load_checkpoint(runs["tmp"] / "fsdp_to_one")
    assert state["step"] == 2 and len(state["rng"]["ranks"]) == 2
    # train.checkpoint_format=auto under FSDP2: each rank wrote its shards (gpt.dcp), no ckpt.pt
    run = runs["tmp"] / "fsdp_to_one"
    shards = sorted(p.name for p in (run / "ckpt-0000002.dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and not (run / "ckpt.pt").exists()
    assert_same_losses(read_metrics(runs["tmp"] / "fsdp_to_one"), runs["ref"], [0, 1, 2])


def test_fsdp_checkpoint_resumes_on_two_nodes_and_in_one_process(runs):
    tmp = runs["tmp"]
    rc, out, _ = runs["fsdp_slurm"]
    assert rc == 0, out[-3000:]
    assert "2 nodes x 1 processes" in out and "resuming" in out
    assert_same_losses(read_metrics(tmp / "fsdp_stop"), runs["ref"], list(range(MAX_STEPS + 1)))
    train(compose(runs["args"]("fsdp_to_one", "resume=true")))
    assert_same_losses(read_metrics(tmp / "fsdp_to_one"), runs["ref"], [3, 4])
    # the layout is one thing: full tensors, optimizer state keyed by parameter name, whoever wrote it
    a, b = load_checkpoint(tmp / "fsdp_stop"), load_checkpoint(tmp / "ddp")
    assert set(a["model"]) == set(b["model"]) and set(a["optimizer"]["state"]) == set(b["optimizer"]["state"])
    assert "transformer.wte.weight" in a["optimizer"]["state"]
    loaded = load(tmp / "fsdp_stop")  # what sample.py does
    model, tokenizer = loaded.build(), loaded.tokenizer
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    assert torch.isfinite(model(idx)).all()


def test_ranks_read_disjoint_slices_that_make_up_the_global_batch(corpus, tmp_path):
    cfg = compose(overrides(corpus, tmp_path / "cache", tmp_path / "out"))
    data = prepare(cfg.data, block_size=32, show_progress=False)
    windows = TokenWindows(data.train_shards, 32, seed=7)
    batch = 24
    for world in (1, 2, 3, 4):
        mbs, _ = split_batch(batch, 2, world)
        for step in (0, 5):
            per_rank = []
            for rank in range(world):
                info = Ranks(rank=rank, world_size=world)
                starts = D.micro_batch_starts(batch, mbs, info)
                per_rank.append([p for s in starts for p in range(s, s + mbs)])
                x = torch.cat([windows.get(step, batch, s, mbs)[0] for s in starts])
                assert torch.equal(x, windows.get(step, batch, per_rank[-1][0], len(per_rank[-1]))[0])
            positions = sorted(p for ps in per_rank for p in ps)
            assert positions == list(range(batch)), (world, per_rank)  # disjoint, and all of the batch
            ids = windows.window_starts(step, batch)
            seen = [set(ids[ps].tolist()) for ps in per_rank]
            assert all(not (seen[i] & seen[j]) for i in range(world) for j in range(i + 1, world))


def test_a_global_batch_that_cannot_be_split_is_rejected_with_valid_values():
    assert split_batch(16, 2, 4) == (2, 2)
    with pytest.raises(ConfigError, match=r"train.batch_size=10 .* 4 processes.*\b8\b.*\b12\b"):
        split_batch(10, None, 4)
    with pytest.raises(ConfigError, match=r"micro_batch_size=3 .*valid values: \[1, 2, 4\]"):
        split_batch(8, 3, 2)


def test_activation_checkpointing_changes_nothing_but_memory(make_cfg):
    plain = make_cfg("plain", train=dict(max_steps=3, eval_interval=1))
    checkpointed = make_cfg("ac", train=dict(max_steps=3, eval_interval=1, activation_checkpointing=True))
    train(plain), train(checkpointed)
    want = read_metrics(plain.out_dir)
    assert_same_losses(read_metrics(checkpointed.out_dir), want, [0, 1, 2, 3], rel=1e-6)


def test_bad_distributed_settings_are_config_errors():
    # checked once, by the config: the process-group and wrapping code trusts it
    with pytest.raises(ConfigError, match="timeout_s"):
        TrainRunConfig.from_dict({"train": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"train.parallel='zero3' must be one of \['ddp', 'fsdp'\]"):
        TrainRunConfig.from_dict({"train": {"parallel": "zero3"}})


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_exit_143(make_cfg):
    cfg = make_cfg(train=dict(max_steps=6, eval_interval=0))
    kill_at_2 = lambda step: step == 2 and os.kill(os.getpid(), signal.SIGTERM) and False
    stopped = train(cfg, should_stop=kill_at_2)["stopped"]
    assert stopped == "SIGTERM" and EXIT_STATUS[stopped] == 143  # train.py's exit status
    # the signal came after step 2's check: step 3 is finished and saved, then the run exits
    assert load_checkpoint(cfg.out_dir)["step"] == 3


def test_each_rank_resumes_its_own_random_stream():
    saved = [torch.manual_seed(s).get_state() for s in (1, 2)]
    rng = {"torch": saved[0], "ranks": [{"torch": t} for t in saved]}
    draws = []
    for rank in range(3):  # the saving run had 2 ranks, this one has 3
        D.restore_rng(rng, Ranks(rank=rank, world_size=3), seed=7, step=10)
        draws.append(torch.rand(4))
    for rank in (0, 1):
        torch.set_rng_state(saved[rank])
        assert torch.equal(draws[rank], torch.rand(4))
    assert not torch.equal(draws[2], draws[0]) and not torch.equal(draws[2], draws[1])
    D.restore_rng({"torch": saved[1]}, Ranks(), seed=7, step=10)  # a one-process checkpoint
    assert torch.equal(torch.rand(4), draws[1])


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(corpus, tmp_path):
    endless = ("train.max_steps=100000", "train.eval_interval=0", "train.ckpt_interval=0")
    args = overrides(corpus, tmp_path / "cache", tmp_path / "run", *endless)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(torchrun("train.py", *args), cwd=REPO_ROOT, env=env, **pipe)
    for line in proc.stdout:
        if re.match(r"step +20/", line):
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, out
    step = load_checkpoint(tmp_path / "run")["step"]
    assert 20 <= step < 100000 and f"stopped at step {step}" in out, out[-3000:]


def test_a_world_of_one_agrees_with_itself():
    ranks = Ranks.current()  # no process group: a world of one, every agreement the identity
    assert ranks == Ranks() and (ranks.is_main, ranks.enabled) == (True, False)
    assert ranks.sum([3, 4]) == [3, 4] and ranks.max([2]) == [2] and ranks.broadcast(7) == 7
    assert ranks.main_first(lambda: "made") == "made"
    ranks.check_same("fingerprint", "settings")
    ranks.wait_all("nothing")
    ranks.agree(None)
    with pytest.raises(ConfigError, match="this rank's own"):
        ranks.agree(ConfigError("this rank's own error"))
