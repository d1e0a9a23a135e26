"""The one command-line convention (gpt.cli): Hydra overrides, positional words, free text that
reaches the model verbatim, the keys the user typed, one-line errors; and the `gpt` command."""

import subprocess
import sys

import pytest

from gpt.commands.cli import Command, compose_config, defaults_of, main, split_args
from gpt.commands.prepare import COMMAND as PREPARE
from gpt.commands.sample import SAMPLE
from gpt.commands.train import TRAIN, train_job
from gpt.config import TrainRunConfig
from gpt.errors import UserError
from gpt.infer.config import SampleConfig
from gpt.typed_config import REPO_ROOT

# every character Hydra's override grammar would reject or change
FREE_TEXTS = [
    "Hello, who are you?",
    "a | b",
    "x < y > z",
    "key=value = more",
    'it\'s "quoted" `too`',
    "[brackets] {braces} (parens)",
    "time: 12:30",
    "back\\slash \\n stays two characters",
    "two\nlines\n",
    "naïve café — 日本語 🙂",
    "hi <|endoftext|> there <|end_of_turn|>",
    "${oc.env:HOME} is not interpolated",
    "",
]


@pytest.mark.parametrize("text", FREE_TEXTS)
def test_free_text_reaches_the_config_verbatim(text):
    cfg, given = compose_config(SAMPLE, [f"prompt={text}", f"system={text}", "temperature=0"])
    assert cfg["prompt"] == text and cfg["system"] == text
    assert SampleConfig.from_dict(cfg).prompt == text
    assert {"prompt", "system", "temperature"} <= given


def test_repeated_stop_strings_make_a_list_and_one_stays_a_string():
    cfg, _ = compose_config(SAMPLE, ["stop=\n\n", "stop=THE END, ok"])
    assert cfg["stop"] == ["\n\n", "THE END, ok"]
    assert SampleConfig.from_dict(cfg).generation().stop == ["\n\n", "THE END, ok"]


def test_a_stop_list_in_hydra_syntax_gives_its_items():
    cfg, _ = compose_config(SAMPLE, ['stop=[" ", "THE END, ok"]', "stop=\n"])
    assert cfg["stop"] == [" ", "THE END, ok", "\n"]
    assert compose_config(SAMPLE, ["stop=[]"])[0]["stop"] == []
    assert compose_config(SAMPLE, ["stop=[a"])[0]["stop"] == ["[a"]  # not a list: verbatim
    assert compose_config(SAMPLE, ["prompt=[x]"])[0]["prompt"] == "[x]"  # only stop is a list
    with pytest.raises(UserError, match="is not a list in Hydra's syntax"):
        compose_config(SAMPLE, ["stop=[a]]"])


def test_positional_words_and_typed_keys():
    command = Command("prepare", PREPARE.schema, positional=("data.path",), free_text=("data.path",))
    overrides, free, given = split_args(["my corpus, v2/", "data.tokenizer=char", "model=x"], command)
    assert free == {"data.path": "my corpus, v2/"} and overrides == ["data.tokenizer=char", "model=x"]
    assert given == {"data.path", "data.tokenizer", "model"}
    with pytest.raises(UserError, match="unexpected argument 'extra'"):
        split_args(["a", "extra"], command)


def test_paths_with_glob_characters_and_commas_pass_verbatim():
    cfg, given = compose_config(TRAIN, ["data=text", "data.path=runs/[2024], v1/*.txt", "out_dir=out/a,b"])
    assert cfg["data"]["path"] == "runs/[2024], v1/*.txt" and cfg["out_dir"] == "out/a,b"


def test_mistakes_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown config key 'train.max_step'"):
        compose_config(TRAIN, ["train.max_step=3"])
    with pytest.raises(UserError, match="missing mandatory value data.path"):  # the preset's null path
        TrainRunConfig.from_dict(compose_config(TRAIN, ["data=text"])[0])
    with pytest.raises(UserError, match="unknown preset model=nope"):
        compose_config(TRAIN, ["model=nope"])


def test_help_lists_the_presets_and_every_key_with_its_value_and_doc(capsys):
    main(train_job, TRAIN, ["--help", "model=gpt2", "optim.lr=3e-4"])
    out = capsys.readouterr().out
    assert "model=NAME presets (conf/model/): chat_small, gpt2," in out and "experiment=NAME" in out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    top = defaults_of(TrainRunConfig)
    keys = [k for k, v in top.items() if not isinstance(v, dict)]
    keys += [f"{k}.{sub}" for k, v in top.items() if isinstance(v, dict) for sub in v]
    assert set(keys) == set(lines)
    assert all("  # " in line for line in lines.values())  # each with its doc
    assert lines["model.n_layer"].split("#")[0].split(":")[1].strip() == "12"  # the composed value
    assert "3e-4" in lines["optim.lr"] or "0.0003" in lines["optim.lr"]
    assert "Peak learning rate" in lines["optim.lr"]


def run_gpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_the_gpt_command_lists_its_verbs_and_rejects_unknown_ones():
    r = run_gpt("--help")
    assert r.returncode == 0 and all(v in r.stdout for v in ("train", "sample", "chat", "prepare", "export"))
    r = run_gpt("frobnicate")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown verb 'frobnicate'")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny random model with GPT-2's byte-level tokenizer: it can encode any text."""
    import torch

    from gpt.checkpoint import checkpoint_state, save_checkpoint
    from gpt.model import GPT, GPTConfig
    from gpt.tokenizer_load import gpt2_tokenizer

    directory = tmp_path_factory.mktemp("bpe_run")
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(directory / "ckpt.pt", checkpoint_state(model.state_dict(), model.config, tok.to_state()))
    return directory


def test_sample_py_takes_any_prompt_verbatim(bpe_run, tmp_path):
    """The real script: every character of FREE_TEXTS in one prompt, echoed unchanged before the sample."""
    text = " ".join(FREE_TEXTS)
    args = [f"ckpt={bpe_run}", f"prompt={text}", "max_new_tokens=2", "temperature=0", "stop=\n", "stop=, "]
    script = [sys.executable, str(REPO_ROOT / "sample.py"), *args]
    r = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(text)
