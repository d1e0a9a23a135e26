"""Configuration: every shipped preset composes and converts to the typed config; bad keys and
values are rejected with the key's name; the optimizer and schedule behave as documented."""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gpt.config import REPO_ROOT, OptimConfig, TrainRunConfig
from gpt.errors import ConfigError
from gpt.model import GPT, GPTConfig
from gpt.train.loop import split_batch
from gpt.train.optim import configure_optimizer, lr_at

CONF = REPO_ROOT / "conf"


def compose_train(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", presets("model"))
def test_every_model_preset_composes_and_builds_a_valid_config(model):
    cfg = TrainRunConfig.from_dict(compose_train([f"model={model}"]))
    given = cfg.model.given()
    if model == "init":
        assert given == {}, "model=init leaves the whole shape to the checkpoint"
    else:
        with torch.device("meta"):
            built = GPT(GPTConfig(**given, vocab_size=128))  # validate() raises on an impossible shape
        assert {k: getattr(built.config, k) for k in given} == given


@pytest.mark.parametrize("data", presets("data"))
def test_every_data_preset_composes(data):
    overrides = [f"data={data}"] + (["data.path=x.txt"] if data in ("text", "dialogs") else [])
    cfg = TrainRunConfig.from_dict(compose_train(overrides))
    assert cfg.data.name


@pytest.mark.parametrize("experiment", presets("experiment"))
def test_every_experiment_preset_composes(experiment):
    overrides = [f"experiment={experiment}", "init_from=somewhere"]
    if experiment == "sft":
        overrides.append("data.path=x.jsonl")
    cfg = TrainRunConfig.from_dict(compose_train(overrides))
    assert cfg.experiment == experiment


def test_gpt2_preset_is_124m_parameters():
    cfg = TrainRunConfig.from_dict(compose_train(["model=gpt2"]))
    with torch.device("meta"):
        model = GPT(GPTConfig(**cfg.model.given(), vocab_size=50257))
    assert 123e6 < model.num_params() < 125e6


def test_unknown_key_is_named():
    d = compose_train([])
    d["train"]["max_step"] = 10
    with pytest.raises(ConfigError, match="train.max_step"):
        TrainRunConfig.from_dict(d)


@pytest.mark.parametrize(
    "path, value, key",
    [
        (("train", "max_steps"), "ten", "train.max_steps"),
        (("optim", "schedule"), "step", "optim.schedule"),
        (("train", "compile"), "yes", "train.compile"),
        (("device",), "tpu", "device"),
    ],
)
def test_wrong_types_and_values_are_named(path, value, key):
    d = compose_train([])
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=key):
        TrainRunConfig.from_dict(d)


def test_batch_split_and_its_errors():
    assert split_batch(64, None, 1) == (64, 1)
    assert split_batch(64, 8, 2) == (8, 4)
    with pytest.raises(ConfigError, match=r"valid values: \[1, 2, 4, 8, 16, 32\]"):
        split_batch(64, 12, 2)
    with pytest.raises(ConfigError, match="multiple of 3"):
        split_batch(64, None, 3)


def test_schedule_warmup_peak_and_end():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    values = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    lin = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(50, lin, 100) == pytest.approx(0.5)
    const = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant")
    assert lr_at(99, const, 100) == 1.0


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16, bias=True))
    opt = configure_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_params = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def key_lines_without_comment(text: str) -> list[str]:
    """The lines of a YAML file that set a key to a value without a comment (Hydra's own hydra:
    block excepted: it is not ours to document)."""
    missing, in_hydra = [], False
    for line in text.splitlines():
        if line.startswith("hydra:"):
            in_hydra = True
        elif line.strip() and not line.startswith(" "):
            in_hydra = False
        if not in_hydra and re.match(r"^\s*[A-Za-z_][\w.-]*:\s*[^\s#]", line) and "#" not in line:
            missing.append(line)
    return missing


def test_shipped_configs_have_comments_for_every_key():
    files = sorted(Path(CONF).rglob("*.yaml"))
    assert len(files) > 10
    for path in files:
        text = path.read_text()
        assert text.lstrip().startswith("#"), f"{path} should open with a comment saying what it is"
        assert key_lines_without_comment(text) == [], f"{path}: keys without a comment"


def test_the_comment_check_finds_an_undocumented_key():
    text = "# doc\nlr: 1.0  # peak\nbeta1: 0.9\nhydra:\n  run: x\n"
    assert key_lines_without_comment(text) == ["beta1: 0.9"]
