"""train.py's bad-input contract: one line `error: ...` naming the file/key and the fix, exit code 2,
no traceback, and nothing already on disk lost. Most cases run the entry point's job in-process
(the same code path minus Hydra's composition); Hydra's own errors run the real script."""

import subprocess
import sys

import pytest

from gpt.commands.cli import run
from gpt.commands.train import train_job
from gpt.typed_config import REPO_ROOT


def run_job(make_cfg, capsys, **sections):
    cfg = make_cfg(**sections).to_dict()
    with pytest.raises(SystemExit) as exc:
        run(train_job, cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert exc.value.code == 2
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "not found"),
        (b"", "empty"),
        (b"\x00\x01\x02binary\x00" * 50, "binary"),
        (b"caf\xe9 au lait\n" * 50, "UTF-8"),
        (b"too short\n", "block_size"),
    ],
    ids=["missing", "empty", "binary", "not-utf8", "shorter-than-a-window"],
)
def test_bad_corpus_files(make_cfg, capsys, tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    message = run_job(make_cfg, capsys, data=dict(path=str(path)))
    assert expected in message and "corpus.txt" in message


def test_n_embd_not_divisible_by_n_head(make_cfg, capsys):
    message = run_job(make_cfg, capsys, model=dict(n_embd=30, n_head=4))
    assert "n_head" in message and "n_embd" in message


def test_corrupt_checkpoint_on_resume_is_reported_and_kept(make_cfg, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"garbage")
    message = run_job(make_cfg, capsys, resume=True)
    assert "corrupt" in message and "ckpt.pt" in message
    assert (out / "ckpt.pt").read_bytes() == b"garbage"


def test_init_from_missing_checkpoint(make_cfg, capsys, tmp_path):
    message = run_job(make_cfg, capsys, init_from=str(tmp_path / "nowhere"))
    assert "no checkpoint" in message


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


def test_unknown_key_and_unknown_preset_via_hydra():
    for args, needle in [(["train.max_stepz=3"], "max_stepz"), (["model=gpt5"], "gpt5")]:
        result = _script(*args)
        assert result.returncode != 0
        assert needle in result.stderr
        assert "Traceback" not in result.stderr


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, corpus):
    """A real signal to the real script: the step finishes, ckpt.pt is written, exit is non-zero,
    and resume=true carries on to max_steps."""
    import signal
    import time

    from gpt.checkpoint import load_checkpoint

    args = [
        sys.executable,
        "-u",
        str(REPO_ROOT / "train.py"),
        "model=tiny",
        f"data.path={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path / 'run'}",
        "train.max_steps=100000",
        "train.batch_size=4",
        "train.eval_interval=0",
        "train.log_interval=1",
        "train.ckpt_interval=0",
        "train.peak_flops=1e12",
        "wandb.mode=disabled",
        "device=cpu",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 90
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "resume=true" in err
    step = load_checkpoint(tmp_path / "run")["step"]
    assert step >= 1
    resume_args = [a for a in args if not a.startswith("train.max_steps=")]
    resume_args += [f"train.max_steps={step + 3}", "resume=true"]
    resumed = subprocess.run(resume_args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "run")["step"] == step + 3
