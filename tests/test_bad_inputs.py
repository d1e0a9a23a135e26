"""Every bad input a new user tried, through the real ``train.py`` / ``sample.py`` / ``gpt eval dialogs``:
a non-zero exit, one ``error:`` line on stderr naming the key or the file, no traceback, and no file
created or changed. docs/bad_inputs.md lists the same cases with their messages.

The cases run in one Python process per batch (starting the interpreter, torch and Hydra once):
the driver runs each script as ``python SCRIPT ARGS`` would (``runpy`` with ``__name__ ==
"__main__"``), records its exit code and stderr, and reports any exception that escaped as a
traceback. A few cases also run as separate processes, to check the real exit status."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer
from gpt.typed_config import REPO_ROOT

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"

# (script, arguments, words the one error line must contain); {run}, {tmp} are filled in
TRAIN_CASES = [
    (["optim.lr=nan"], ["optim.lr=nan", "finite number > 0"]),
    (["optim.lr=inf"], ["optim.lr=inf", "finite"]),
    (["optim.lr=0"], ["optim.lr=0.0", "> 0"]),
    (["optim.min_lr_ratio=1.5"], ["optim.min_lr_ratio=1.5", "[0, 1]"]),
    (["optim.min_lr_ratio=-0.1"], ["optim.min_lr_ratio=-0.1", "[0, 1]"]),
    (["optim.beta1=1.0"], ["optim.beta1=1.0", "[0, 1)"]),
    (["optim.beta2=-0.5"], ["optim.beta2=-0.5", "[0, 1)"]),
    (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1", ">= 0"]),
    (["optim.grad_clip=-1"], ["optim.grad_clip=-1.0", ">= 0"]),
    (["train.max_steps=0"], ["train.max_steps=0", ">= 1"]),
    (["train.micro_batch_size=0"], ["train.micro_batch_size=0", ">= 1"]),
    (["train.eval_interval=-1"], ["train.eval_interval=-1", ">= 0"]),
    (["train.ckpt_interval=-5"], ["train.ckpt_interval=-5", ">= 0"]),
    (["train.log_interval=0"], ["train.log_interval=0", ">= 1"]),
    (["train.eval_steps=0"], ["train.eval_steps=0", ">= 1"]),
    (["seed=-1"], ["seed=-1", "[0, 2**63"]),
    (["seed=18446744073709551616"], ["seed=18446744073709551616", "[0, 2**63"]),
    (["data.path={tmp}/no_such_corpus.txt"], ["no_such_corpus.txt", "not found"]),
]
SAMPLE_CASES = [
    (["seed=18446744073709551616"], ["seed=18446744073709551616", "[0, 2**64)"]),
    (["seed=-3"], ["seed=-3", "[0, 2**64)"]),
    (["temperature=-1"], ["temperature=-1.0", ">= 0"]),
    (["temperature=nan"], ["temperature=nan"]),
    (["top_p=0"], ["top_p=0.0", "(0, 1]"]),
    (["num_samples=0"], ["num_samples=0", ">= 1"]),
    (["num_samples=100000000"], ["num_samples=100000000", "free", "lower num_samples"]),
    (["num_beams=100000000"], ["num_beams=100000000", "free", "lower num_beams"]),
    (["num_beams=2", "num_samples=3"], ["num_samples=3", "num_beams=2"]),
    (["frequency_penalty=1e308"], ["frequency_penalty=1e+308", "[-1e4, 1e4]"]),
    (["prompt_file={tmp}/missing.txt"], ["prompt_file=", "missing.txt", "no such file"]),
    (["prompt_file={tmp}"], ["prompt_file=", "is a directory"]),
    (["prompt_file={tmp}/latin1.txt"], ["prompt_file=", "latin1.txt", "not UTF-8"]),
    (["ckpt={tmp}/no_run"], ["no checkpoint at", "no_run"]),
    (["ckpt={tmp}/corrupt.pt"], ["corrupt.pt", "is corrupt", "failed finding central directory."]),
    (["temperature=it's"], ["temperature=it's", "column 15", "override_grammar"]),
    (["prompt=\u00e9t\u00e9 \U0001f600"], ["character", "vocabulary"]),
    (["max_tokens=5"], ["unknown config key 'max_tokens'"]),
    (["--num_samples", "3"], ["--num_samples: options are key=value here, e.g. num_samples="]),
    (["--verbose"], ["unknown option --verbose", "key=value"]),
    (["-m", "--cfg", "job"], ["Only one of --run, --multirun, --cfg"]),
]
EVAL_CASES = [
    (["batch_size=0"], ["batch_size=0", ">= 1"]),
    (["limit=-1"], ["limit=-1", ">= 0"]),
]

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for target, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    sys.argv = [target, *argv]
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with a tiny run (run/ckpt.pt), a corrupt checkpoint and a Latin-1 prompt file."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    tok = char_tokenizer([TEXT])
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64))
    save_checkpoint(tmp / "run" / "ckpt.pt", {
        "model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tok.to_state(),
        "optimizer": None, "step": 0, "tokens": 0, "rng": {}, "config": {}, "best_val_loss": None,
    })  # fmt: skip
    (tmp / "corrupt.pt").write_bytes((tmp / "run" / "ckpt.pt").read_bytes()[:3000])
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return tmp


def tree(*roots: Path) -> dict[str, str]:
    """Every file under the roots with a hash of its bytes and its mode."""
    found = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return found


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run_batch(cases: list[tuple[str, list[str]]], cwd: Path) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=cwd, env=env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def check(result: dict, words: list[str], case) -> None:
    err = result["stderr"]
    assert result["code"] != 0, (case, err)
    assert "Traceback" not in err, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
    for word in words:
        assert word in lines[0], (case, word, lines[0])


def fill(args: list[str], files: Path) -> list[str]:
    return [a.format(run=files / "run", tmp=files) for a in args]


@pytest.mark.parametrize("which", ["train", "sample"])
def test_every_bad_input_is_one_line_naming_the_key_and_changes_nothing(files, tmp_path, which):
    batches = {
        "train": [(str(REPO_ROOT / "train.py"), TRAIN_CASES, [f"out_dir={tmp_path}/out", "device=cpu",
                   "train.max_steps=1", f"data.cache_dir={tmp_path}/cache", "wandb.mode=disabled"])],
        "sample": [(str(REPO_ROOT / "sample.py"), SAMPLE_CASES, [f"ckpt={files}/run", "device=cpu",
                    "max_new_tokens=4", "history_file=null"]),
                   ("gpt", EVAL_CASES, ["eval", "dialogs", f"ckpt={files}/run", "device=cpu"])],
    }  # fmt: skip
    runs = [(target, common + fill(args, files), words) for target, cases, common in batches[which]
            for args, words in cases]  # fmt: skip
    before = tree(files, tmp_path)
    results = run_batch([(target, argv) for target, argv, _ in runs], cwd=tmp_path)
    for (_, argv, words), result in zip(runs, results, strict=True):
        check(result, fill(words, files), argv)
    assert tree(files, tmp_path) == before  # no file created, changed or removed


def test_real_processes_exit_with_status_2(files, tmp_path):
    for script, args in [("train.py", ["optim.lr=nan"]), ("sample.py", [f"ckpt={files}/run", "seed=-3"])]:
        r = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=tmp_path, env=env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["sample", "check_dialogs"])
def test_a_closed_pipe_ends_quietly(files, tmp_path, command):
    """``... | head``: the reader goes away; the command stops without a BrokenPipeError."""
    if command == "sample":
        args = [str(REPO_ROOT / "sample.py"), f"ckpt={files}/run", "device=cpu", "max_new_tokens=100000"]
    else:
        dialog = {"messages": [{"role": "user", "content": "ROMEO"}, {"role": "assistant", "content": "Ay"}]}
        (tmp_path / "d.jsonl").write_text((json.dumps(dialog) + "\n") * 3000)
        char_tokenizer([TEXT]).save(tmp_path / "tok")
        args = ["-m", "gpt", "check-dialogs", str(tmp_path / "d.jsonl"), f"tokenizer={tmp_path / 'tok'}",
                "show=3000"]
    p = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout.read(20)  # like `head -c 20`, then close
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.slow
def test_run_files_share_one_mode(tmp_path, corpus):
    """ckpt.pt and best.pt get the mode of the run's other files (others may read a shared run)."""
    args = [f"out_dir={tmp_path}/out", "device=cpu", f"data.path={corpus}", f"data.cache_dir={tmp_path}/c",
            "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16",
            "train.max_steps=2", "train.batch_size=2", "train.eval_interval=1", "train.eval_steps=1",
            "train.keep_best=true", "wandb.mode=disabled", "train.progress=false", "train.peak_flops=1e12",
            "data.num_workers=1"]  # fmt: skip
    r = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert {"ckpt.pt", "best.pt", "config.yaml"} <= set(modes) and len(set(modes.values())) == 1, modes


@pytest.mark.slow
def test_ctrl_c_under_torchrun_is_noticed_once(tmp_path, corpus):
    """Ctrl-C reaches every process of the group; the notice is printed once (rank 0), the run
    checkpoints and says how to resume."""
    import signal
    import time

    args = [f"out_dir={tmp_path}/out", "device=cpu", f"data.path={corpus}", f"data.cache_dir={tmp_path}/c",
            "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16",
            "train.max_steps=1000000", "train.batch_size=4", "train.eval_interval=0", "train.log_interval=20",
            "wandb.mode=disabled", "train.progress=false", "train.peak_flops=1e12",
            "data.num_workers=1"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "train.py"), *args]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)  # fmt: skip
    try:
        for line in p.stdout:  # wait until training is under way (the step lines go to stdout)
            if line.startswith("step"):
                break
        time.sleep(1)
        os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert err.count("SIGINT received") == 1, err
    assert "continue with resume=true" in err and (tmp_path / "out" / "ckpt.pt").is_file()
