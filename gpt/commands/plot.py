"""Plot the curves of one or several runs as a PNG: train/val loss, and val bits per byte, rewards
(GRPO) and task scores when the runs logged them (``pip install 'gpt[plot]'`` for matplotlib).

    gpt plot out/shakespeare_char out/shakespeare               # -> runs.png
    gpt plot out/a out/b x=tokens out=docs/loss.png title='char vs BPE'
    gpt plot out/a x=time

Every bare word is a run directory (its ``metrics.jsonl``); the legend names each run by its
directory. ``x`` is the optimizer step, the tokens seen, or the wall time in minutes. Keys:
PlotConfig (``gpt plot --help``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpt.atomic import atomic_write
from gpt.commands.cli import Command, main
from gpt.errors import ConfigError, DataError
from gpt.runs.metrics import read_metrics
from gpt.typed_config import from_dict

# x: (metrics key, scale, axis label)
X_KEYS = {"step": ("step", 1.0, "step"), "tokens": ("tokens", 1.0, "tokens"),
          "time": ("elapsed_s", 1 / 60, "minutes")}  # fmt: skip


@dataclass
class PlotConfig:
    runs: list[str] = field(default_factory=list)
    """Run directories (each bare word on the command line is one)."""
    x: Literal["step", "tokens", "time"] = "step"
    """The x axis: step | tokens | time (wall-clock minutes)."""
    out: str = "runs.png"
    """The PNG written."""
    title: str | None = None
    """A title above the plots."""
    dpi: int = 120
    """Resolution of the PNG."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("no run to plot; give run directories: gpt plot out/a out/b")


COMMAND = Command("plot", schema=PlotConfig, free_text=("runs", "out", "title"), repeatable=("runs",),
                  usage="gpt plot RUN_DIR [RUN_DIR ...] [x=step|tokens|time] [out=FILE.png]")


def load_runs(runs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """{legend name: metrics records} of each run directory."""
    names = [Path(r).name or str(r) for r in runs]
    out = {}
    for run, name in zip(runs, names):
        if not (Path(run) / "metrics.jsonl").is_file():
            raise DataError(f"{run} has no metrics.jsonl; give the out_dir of a training run")
        label = name if names.count(name) == 1 else str(run)  # two runs named alike: their paths
        out[label] = read_metrics(run)
    return out


def panels(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """(title, metric keys) of each subplot: loss, then bpb, rewards (GRPO: the greedy replies' mean
    reward and exact-answer accuracy) and task scores when any run has them."""
    keys = {k for records in runs.values() for r in records for k, v in r.items() if v is not None}
    found = [("loss", ["train_loss", "val_loss"])]
    if "val_bpb" in keys:
        found.append(("val bits per byte", ["val_bpb"]))
    if "val_reward" in keys:
        found.append(("reward", [k for k in ("train_reward", "val_reward", "val_accuracy") if k in keys]))
    tasks = sorted(k for k in keys if "/" in k)
    if tasks:
        found.append(("task scores", tasks))
    return found


def plot(cfg: PlotConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = load_runs(cfg.runs)
    x, scale, x_label = X_KEYS[cfg.x]
    layout = panels(runs)
    fig, axes = plt.subplots(1, len(layout), figsize=(5.5 * len(layout), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes[0], layout):
        for i, (name, records) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                points = [(r[x] * scale, r[key]) for r in records if r.get(key) is not None and x in r]
                if points:
                    xs, ys = zip(*points)
                    label = name if len(keys) == 1 else f"{name} {key}"
                    ax.plot(xs, ys, styles[j % len(styles)], color=colors[i % len(colors)], label=label)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if cfg.title:
        fig.suptitle(cfg.title)
    fig.tight_layout()
    out = Path(cfg.out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=cfg.dpi))
    plt.close(fig)
    return out


def job(cfg: dict[str, Any]) -> Path:
    out = plot(from_dict(PlotConfig, cfg))
    print(f"wrote {out}")
    return out


def run(argv: Sequence[str] | None = None) -> Path:
    """Bare words are run directories (``runs=``), any number of them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a if "=" in a or a.startswith("-") else f"runs={a}" for a in argv]
    return main(job, COMMAND, argv)

