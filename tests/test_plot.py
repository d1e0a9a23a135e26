"""gpt plot: a PNG of the curves of several runs, with the panels their metrics allow."""

import json

import pytest

from gpt.commands.plot import load_runs, panels
from gpt.commands.plot import run as plot_main
from gpt.errors import DataError

pytest.importorskip("matplotlib", reason="matplotlib is an optional extra: pip install 'gpt[plot]'")


def fake_run(directory, with_tasks: bool):
    """A metrics.jsonl as training writes it."""
    directory.mkdir(parents=True)
    rows = []
    for step in (0, 50, 100):
        r = {"step": step, "tokens": step * 512, "train_loss": 4 - step / 50, "val_loss": 4.1 - step / 50,
             "val_bpb": 5.0 - step / 40, "lr": 1e-3, "elapsed_s": step * 1.5}  # fmt: skip
        if with_tasks:
            r["cloze/acc"] = 0.25 + step / 400
        rows.append(json.dumps(r))
    (directory / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return directory


def test_plot_writes_a_png_of_several_runs(tmp_path, capsys):
    a = fake_run(tmp_path / "a" / "char", with_tasks=True)
    b = fake_run(tmp_path / "b" / "bpe", with_tasks=False)
    out = tmp_path / "loss.png"
    plot_main([str(a), str(b), "x=tokens", f"out={out}", "title=char vs bpe"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"wrote {out}" in capsys.readouterr().out
    runs = load_runs([str(a), str(b)])
    assert list(runs) == ["char", "bpe"]
    assert [title for title, _ in panels(runs)] == ["loss", "val bits per byte", "task scores"]
    assert [title for title, _ in panels({"bpe": runs["bpe"]})] == ["loss", "val bits per byte"]


def test_plot_names_a_directory_without_metrics(tmp_path):
    with pytest.raises(DataError, match="has no metrics.jsonl"):
        load_runs([str(tmp_path)])


def test_a_grpo_run_gets_a_reward_panel(tmp_path):
    directory = tmp_path / "grpo"
    directory.mkdir()
    rows = [{"step": s, "tokens": 0, "train_loss": -r, "val_loss": -r, "val_bpb": None, "train_reward": r,
             "val_reward": r, "val_accuracy": r, "val_reward_std": 0.4, "lr": 1e-5, "elapsed_s": s}
            for s, r in ((0, 0.3), (20, 0.5))]  # fmt: skip
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = load_runs([str(directory)])
    assert panels(runs) == [("loss", ["train_loss", "val_loss"]),
                            ("reward", ["train_reward", "val_reward", "val_accuracy"])]  # fmt: skip
    plot_main([str(directory), f"out={tmp_path / 'reward.png'}"])
    assert (tmp_path / "reward.png").stat().st_size > 10_000
