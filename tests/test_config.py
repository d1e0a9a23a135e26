"""Configuration: one source of defaults (the dataclasses; a run started from Python is the run the
command line starts, and each key is documented once, in its dataclass); every shipped preset composes
to the config it gave before and converts to the typed config; bad keys and values are rejected with
the key's name; the optimizer and schedule behave as documented."""

import dataclasses
from pathlib import Path

import pytest
import torch

from gpt.commands.bench import COMMAND as BENCH
from gpt.commands.check_dialogs import COMMAND as CHECK_DIALOGS
from gpt.commands.cli import compose_config, defaults_of, field_docs
from gpt.commands.eval import BPB, CLOZE, DIALOGS, TASKS
from gpt.commands.export import EXPORT, MERGE
from gpt.commands.plot import COMMAND as PLOT
from gpt.commands.prepare import COMMAND as PREPARE
from gpt.commands.sample import SAMPLE
from gpt.commands.serve import COMMAND as SERVE
from gpt.commands.train import TRAIN
from gpt.config import OptimConfig, TrainRunConfig
from gpt.errors import ConfigError
from gpt.model import GPT, GPTConfig
from gpt.train.loop import split_batch
from gpt.train.optim import configure_optimizer, lr_at
from gpt.typed_config import REPO_ROOT, from_dict

CONF = REPO_ROOT / "conf"
# every command, with the arguments its default config needs and the same as the dataclass's keyword
# arguments (prepare: the default run's data preset, whose keys are DataConfig's defaults)
ARGS, PATHS = (["ckpt=a", "out=b"], {"ckpt": "a", "out": "b"})
COMMANDS = {TRAIN: ([], {}), SAMPLE: ([], {}), SERVE: ([], {}), PREPARE: (["data=shakespeare_char"], {}),
            PLOT: (["runs=a"], {"runs": ["a"]}), BPB: ([], {}), CLOZE: ([], {}), TASKS: ([], {}),
            DIALOGS: ([], {}), EXPORT: (ARGS, PATHS), MERGE: (ARGS, PATHS), BENCH: ([], {}),
            CHECK_DIALOGS: (["path=a"], {"path": "a"})}  # fmt: skip


def compose_train(overrides: list[str]) -> dict:
    return compose_config(TRAIN, overrides)[0]


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
        # validated once, here: the optimizer, process-group and dtype code trust these
        (("optim", "muon_lr"), -0.02, "optim.muon_lr"),
        (("optim", "muon_momentum"), 1.0, "optim.muon_momentum"),
        (("train", "parallel"), "zero3", "train.parallel"),
        (("train", "timeout_s"), 0, "train.timeout_s"),
        (("train", "dtype"), "fp8", "train.dtype"),
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


# the presets' values that matter, as `python train.py ...` composed them before the defaults moved
# into the dataclasses (same order as PINNED_KEYS)
PINNED_KEYS = ("out_dir", "experiment", "model.n_layer", "model.block_size", "model.activation", "data.name",
               "data.tokenizer", "optim.name", "optim.lr", "optim.weight_decay", "optim.warmup_steps",
               "train.max_steps", "train.batch_size", "train.eval_interval", "train.eval_steps",
               "train.ckpt_interval", "train.log_interval", "train.keep_best", "dpo.sft_weight")  # fmt: skip
PINNED = {
    "":
        ("out/shakespeare_char", "pretrain", 4, 128, "relu2", "shakespeare_char", "char", "adamw", 2e-3, 0.5,
         100, 4000, 16, 500, 20, 500, 10, False, 0.0),
    "experiment=finetune init_from=x":
        ("out/finetune", "finetune", None, None, None, "shakespeare_char", "char", "adamw", 1e-4,
         0.0, 20, 500, 16, 50, 10, 100, 10, True, 0.0),
    "experiment=sft init_from=x":
        ("out/sft", "sft", None, None, None, "dialogs", "bpe", "adamw", 1e-3, 0.0, 20, 2000, 16, 500,
         10, 500, 100, False, 0.0),
    "experiment=dpo init_from=x":
        ("out/dpo", "dpo", None, None, None, "pairs", "bpe", "adamw", 3e-5, 0.0, 10, 200, 16, 50, 19,
         100, 10, False, 2.0),
    "optim=muon":
        ("out/shakespeare_char", "pretrain", 4, 128, "relu2", "shakespeare_char", "char", "muon", 2e-3, 0.1,
         100, 4000, 16, 500, 20, 500, 10, False, 0.0),
    "model=gpt2":
        ("out/shakespeare_char", "pretrain", 12, 1024, "gelu_tanh", "shakespeare_char", "char", "adamw", 2e-3,
         0.5, 100, 4000, 16, 500, 20, 500, 10, False, 0.0),
    "data=shakespeare":
        ("out/shakespeare", "pretrain", 4, 128, "relu2", "shakespeare", "bpe", "adamw", 2e-3, 0.5, 100, 4000,
         16, 500, 20, 500, 10, False, 0.0),
}  # fmt: skip


@pytest.mark.parametrize("args", list(PINNED))
def test_the_presets_compose_to_the_runs_they_gave_before(args):
    composed, given = compose_config(TRAIN, args.split())
    d = TrainRunConfig.from_command_line(composed, given).to_dict()
    values = []
    for key in PINNED_KEYS:
        node = d
        for part in key.split("."):
            node = node[part]
        values.append(node)
    assert dict(zip(PINNED_KEYS, values)) == dict(zip(PINNED_KEYS, PINNED[args]))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.config_name)
def test_a_run_started_from_python_is_the_run_the_command_starts(command):
    """``train(TrainRunConfig())`` trains what ``python train.py`` trains (and the same for every other
    command, e.g. ``evaluate_bpb(BpbConfig())`` and ``gpt eval bpb``): the dataclasses are the one source
    of defaults."""
    argv, kwargs = COMMANDS[command]
    assert from_dict(command.schema, compose_config(command, argv)[0]) == command.schema(**kwargs)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.config_name)
def test_every_key_is_documented_in_its_dataclass(command):
    docs = field_docs(command.schema)
    flat = compose_config(command, [], complete=False)[0]
    keys = [k for k, v in defaults_of(command.schema).items() if not isinstance(v, dict)]
    keys += [f"{k}.{sub}" for k, v in defaults_of(command.schema).items() if isinstance(v, dict) for sub in v]
    assert keys and [k for k in keys if not docs.get(k)] == [], "keys without a doc string under the field"
    assert flat  # and the command composes


def test_the_doc_check_finds_an_undocumented_field():
    @dataclasses.dataclass
    class Example:
        lr: float = 1.0
        """Peak."""
        beta1: float = 0.9

    assert field_docs(Example) == {"lr": "Peak."}


@pytest.mark.parametrize("group, schema", [("model", None), ("data", "data"), ("optim", "optim")])
def test_presets_hold_only_their_differences(group, schema):
    """A preset repeats no default: each value it sets differs from the dataclass default it changes
    (model: from the default run's shape), so a default exists once."""
    import yaml

    base = defaults_of(TrainRunConfig)[schema or group]
    for name in presets(group):
        preset = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
        assert [k for k, v in preset.items() if base.get(k, object()) == v] == [], f"{group}/{name}.yaml"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.config_name)
def test_a_command_file_holds_only_its_presets(command):
    """A command's file of conf/ lists its dataclass's defaults first (NAME_schema) and repeats none of
    them: a key it sets differs from the dataclass's default, so a default exists once."""
    import yaml

    conf = yaml.safe_load((CONF / f"{command.config_name}.yaml").read_text())
    first = conf["defaults"][0]
    assert first.split("@")[0] == f"{command.config_name}_schema", "the schema comes first"
    base = defaults_of(command.schema)
    keys = {k: v for k, v in conf.items() if k not in ("defaults", "hydra")}
    assert [k for k, v in keys.items() if base.get(k, object()) == v] == []


def test_every_shipped_config_says_what_it_is_and_belongs_to_a_command():
    """Every YAML file opens with a comment; every file at the top of conf/ is a command's, and every
    command has a config dataclass (its keys' one place of defaults and docs)."""
    files = sorted(Path(CONF).rglob("*.yaml"))
    assert len(files) > 10
    for path in files:
        assert path.read_text().lstrip().startswith("#"), f"{path}: open with a comment saying what it is"
    assert {p.name for p in CONF.glob("*.yaml")} == {f"{c.config_name}.yaml" for c in COMMANDS}
    assert all(c.schema is not None for c in COMMANDS)
