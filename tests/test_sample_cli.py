"""Tests of sample.py and gpt.infer (sample, repl, chat_repl): stdout/stderr separation, exit code 2
with one clear line for bad input, sample.py's composed defaults against SampleConfig, and the REPL driven by
scripted input."""

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.commands.cli import compose_config, field_docs, run
from gpt.commands.sample import SAMPLE, sample_main
from gpt.infer.config import GenerationConfig, SampleConfig
from gpt.infer.repl import SEPARATOR, Repl, parse_setting
from gpt.infer.sample import sample
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer
from gpt.typed_config import REPO_ROOT

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding a tiny random char-level model."""
    torch.manual_seed(0)
    tok = char_tokenizer([TEXT])
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out / "ckpt.pt", {
        "model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tok.to_state(),
        "optimizer": None, "step": 0, "tokens": 0, "rng": {}, "config": {}, "best_val_loss": None,
    })  # fmt: skip
    return out


def defaults(**overrides) -> dict:
    """The composed sample config, as the command line hands it to the job."""
    return {**compose_config(SAMPLE, [])[0], **overrides}


def run_job(cfg: dict, capsys) -> tuple[int, str, str]:
    code = 0
    try:
        run(sample, cfg)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_py_composes_every_key_with_its_documented_default():
    cfg = defaults()
    assert set(cfg) == {f.name for f in dataclasses.fields(SampleConfig)}
    assert SampleConfig.from_dict(cfg) == SampleConfig()  # sample.py's values are the code's defaults
    docs = field_docs(SampleConfig)
    assert [key for key in cfg if not docs.get(key)] == []


def test_samples_go_to_stdout_and_notices_to_stderr(run_dir, capsys):
    cfg = defaults(ckpt=str(run_dir), prompt="ROMEO:", num_samples=3, max_new_tokens=20, stop=[])
    code, out, err = run_job(cfg, capsys)
    assert code == 0
    samples = out.split(f"\n{SEPARATOR}\n")
    assert len(samples) == 3 and all(s.startswith("ROMEO:") for s in samples)
    assert "sampling" in err and "sampling" not in out and "temperature=0.8" in err
    # the same seed gives the same samples
    assert run_job(cfg, capsys)[1] == out


def test_long_prompt_is_cropped_with_one_notice_and_empty_prompt_works(run_dir, capsys):
    code, out, err = run_job(defaults(ckpt=str(run_dir), prompt=TEXT, max_new_tokens=5), capsys)
    assert code == 0 and err.count("left out") == 1 and out.startswith(TEXT)
    code, out, err = run_job(
        defaults(ckpt=str(run_dir), prompt="", max_new_tokens=5, echo_prompt=False), capsys
    )
    assert code == 0 and len(out) >= 1


@pytest.mark.parametrize(
    "overrides, message",
    [({"ckpt": "no/such/run"}, "no checkpoint at no/such/run"),
     ({"prompt_file": "no_such_prompt.txt"}, "prompt_file=no_such_prompt.txt"),
     ({"top_p": 1.5}, "top_p=1.5"), ({"temperature": -1}, "temperature=-1"), ({"top_k": -3}, "top_k=-3"),
     ({"num_beams": 2, "num_samples": 3}, "num_samples=3"),
     ({"dtype": "fp16", "device": "cpu"}, "dtype=fp16"),
     ({"prompt": "ROMEO: \u00e9"}, "not in the character vocabulary"), ({"max_tokens": 5}, "max_tokens")],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(run_dir, capsys, overrides, message):
    code, out, err = run_job({**defaults(ckpt=str(run_dir)), **overrides}, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_prompt_file(run_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("JULIET:")
    code, out, _ = run_job(
        defaults(ckpt=str(run_dir), prompt_file=str(tmp_path / "p.txt"), max_new_tokens=5), capsys
    )
    assert code == 0 and out.startswith("JULIET:")


def script(lines):
    """input() stand-in: the scripted lines, then Ctrl-D (EOFError)."""
    feed = iter(lines)

    def read(prompt: str) -> str:
        item = next(feed, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read


def repl(run_dir, lines, settings=None, **kw) -> tuple[Repl, io.StringIO, io.StringIO]:
    from gpt.runs.load import load

    loaded = load(run_dir)
    model, tok = loaded.build(), loaded.tokenizer
    out, err = io.StringIO(), io.StringIO()
    settings = settings or GenerationConfig(max_new_tokens=10, seed=3)
    r = Repl(model, tok, settings, input_fn=script(lines), out=out, err=err, **kw)
    return r, out, err


def test_repl_commands_settings_and_save(run_dir, tmp_path):
    transcript = tmp_path / "t.txt"
    lines = ["/settings", "/set temperature 0", "/set top_p 2", "/set nope 1", "/set stop \\n\\n",
             "ROMEO:", "JULIET: Ay\\", "me", f"/save {transcript}", "/reset", "/help", "/what",
             KeyboardInterrupt, "/reset settings", "/quit", "never read"]  # fmt: skip
    r, out, err = repl(run_dir, lines)
    r.run()
    err = err.getvalue()
    assert "temperature = 0.8" in err and "temperature = 0.0" in err  # /settings, then /set
    assert "error: top_p=2.0 is out of range" in err and "error: unknown setting 'nope'" in err
    assert "stop = ['\\n\\n']" in err and "unknown command /what" in err and "/save FILE" in err
    assert "^C" in err and "settings restored" in err and r.settings == r.initial_settings
    saved = transcript.read_text()
    assert ">>> ROMEO:\n" in saved and ">>> JULIET: Ay\n... me\n" in saved and "temperature=0.0" in saved
    assert r.transcript == []  # /reset
    # the replies went to stdout, greedy (temperature 0) and 10 tokens each
    replies = out.getvalue().splitlines()
    assert replies[0] and saved.split(">>> ROMEO:\n")[1].startswith(replies[0])


def test_repl_samples_differ_per_turn_but_sessions_repeat(run_dir):
    first, out1, _ = repl(run_dir, ["ROMEO:", "ROMEO:"])
    first.run()
    second, out2, _ = repl(run_dir, ["ROMEO:", "ROMEO:"])
    second.run()
    a, b = out1.getvalue().splitlines()[:2]
    assert a != b and out1.getvalue() == out2.getvalue()


def test_ctrl_c_stops_the_generation_not_the_loop(run_dir):
    class Interrupting(io.StringIO):
        interrupted = False

        def write(self, s):
            if self.getvalue() and not self.interrupted:  # the first piece is shown, then Ctrl-C
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(s)

    r, _, err = repl(run_dir, ["ROMEO:", "/settings"], settings=GenerationConfig(max_new_tokens=200))
    r.out = Interrupting()
    r.run()
    assert "[stopped]" in err.getvalue() and "max_new_tokens = 200" in err.getvalue()
    [(prompt, [completion])] = r.transcript
    assert prompt == "ROMEO:" and completion.finish_reason == "interrupted" and len(completion.ids) < 200


def test_repl_hooks_make_a_chat_loop(run_dir):
    """The chat issue's REPL plugs in its own prompt rendering, stop token and history."""

    class Chat(Repl):
        empty_line_generates = False

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.history: list[int] = []

        def prompt_ids(self, text):
            return self.history + self.tokenizer.encode(text)

        def stop_token_ids(self):
            return [self.tokenizer.special_id("<|end_of_turn|>")]

        def on_reply(self, text, completions):
            self.history += self.tokenizer.encode(text) + completions[0].ids
            super().on_reply(text, completions)

    from gpt.runs.load import load

    loaded = load(run_dir)
    model, tok = loaded.build(), loaded.tokenizer
    chat = Chat(model, tok, GenerationConfig(max_new_tokens=5), input_fn=script(["Ay", "", "me"]),
                out=io.StringIO(), err=io.StringIO())  # fmt: skip
    chat.run()
    assert len(chat.transcript) == 2 and len(chat.history) > len(tok.encode("Ayme"))


def test_mode_interactive_runs_the_repl(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", script(["/set max_new_tokens 4", "ROMEO:"]))
    code, out, err = run_job(defaults(ckpt=str(run_dir), mode="interactive", history_file=None), capsys)
    assert code == 0 and "interactive mode" in err and "max_new_tokens = 4" in err
    assert len(out.strip("\n")) >= 1  # one reply of 4 tokens on stdout


def test_parse_setting_types():
    s = GenerationConfig()
    assert parse_setting(s, "top_k", "5").top_k == 5
    assert parse_setting(s, "temperature", "1e-3").temperature == 0.001
    assert parse_setting(s, "seed", "none").seed is None
    assert parse_setting(s, "stop", '["a", "\\n"]').stop == ["a", "\n"]
    assert parse_setting(s, "stop", "none").stop == []
    with pytest.raises(Exception, match="top_k='many' must be an integer"):
        parse_setting(s, "top_k", "many")


def sample_py(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_sample_py_end_to_end(run_dir, tmp_path):
    """The real entry point: text on stdout, notices on stderr, no folders or log files created."""
    r = sample_py([f"ckpt={run_dir}", "prompt=ROMEO:\n", "num_samples=2", "max_new_tokens=8"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:\n") and r.stdout.count(SEPARATOR) == 1
    assert "sampling" in r.stderr and "sampling" not in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_sample_py_unknown_key(run_dir, tmp_path):
    """Hydra itself would reject it with several lines and exit code 1."""
    r = sample_py([f"ckpt={run_dir}", "max_tokens=5"], tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: unknown config key 'max_tokens'") and r.stderr.count("\n") == 1


def test_stop_in_hydra_list_syntax_is_a_list_of_stop_strings(run_dir, capsys):
    """stop=[" "] is one stop string " " (it was the literal text '[" "]'); stop=x stays one string."""

    def samples(stop: str) -> tuple[list[str], str]:
        sample_main([f"ckpt={run_dir}", "prompt=ROMEO:", stop, "max_new_tokens=40", "num_samples=4",
                     "temperature=1.0", "device=cpu"])  # fmt: skip
        out, err = capsys.readouterr()
        return [s.removeprefix("ROMEO:").rstrip("\n") for s in out.split(f"\n{SEPARATOR}\n")], err

    free, _ = samples("stop=[]")
    cut, err = samples('stop=[" "]')
    assert "stop=[' ']" in err and any(" " in s for s in free)  # a space was there to stop at
    assert cut == [s.split(" ")[0].rstrip("\n") for s in free]  # (the last line break is the printer's)
    one, err = samples("stop=x")
    assert "stop=['x']" in err and one == [s.split("x")[0].rstrip("\n") for s in free]
    with pytest.raises(SystemExit):
        samples("stop=[a]]")
    assert "error: stop=[a]] is not a list in Hydra's syntax" in capsys.readouterr().err
