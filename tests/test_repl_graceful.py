"""The REPLs fail gracefully: a bad /set, an unencodable message or a failed save never ends the
session nor changes its history; /save never replaces a file unless told (/save!), writes whole
files, and the chat's messages JSONL reads back exactly; /retry, /undo, Ctrl-C keeps a partial reply;
the chat's KV cache is reused across turns with the same replies. Also: prompt_file from pipes and
devices, paths holding glob characters, and sampling at a tiny temperature."""

import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.data.corpus import input_files
from gpt.data.dialogs import read_dialogs
from gpt.errors import DataError
from gpt.infer.chat_repl import ChatRepl
from gpt.infer.config import GenerationConfig, SampleConfig
from gpt.infer.generate import generate_text
from gpt.infer.repl import Repl
from gpt.infer.sample import read_prompt
from gpt.infer.sampling import choose_next
from gpt.model import GPT, GPTConfig
from gpt.runs.load import load
from gpt.tokenizer import char_tokenizer
from gpt.typed_config import REPO_ROOT

# the chat markers' characters too, so that a char-level chat renders
TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"
TEXT += "System: User: Assistant: Be brief.\\"

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = int(os.environ.get("GR_SEED", 1))  # a seed whose replies by the random model are not empty


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding a tiny random char-level model (block 96)."""
    torch.manual_seed(0)
    tok = char_tokenizer([TEXT])
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=64))
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out / "ckpt.pt", {
        "model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tok.to_state(),
        "optimizer": None, "step": 0, "tokens": 0, "rng": {}, "config": {}, "best_val_loss": None,
    })  # fmt: skip
    return out


def script(lines):
    """input() stand-in: the scripted lines (an exception class is raised), then Ctrl-D."""
    feed = iter(lines)

    def read(prompt: str) -> str:
        item = next(feed, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read


def session(run_dir, cls, lines, **kw):
    loaded = load(run_dir)
    model, tok = loaded.build(), loaded.tokenizer
    settings = kw.pop("settings", None) or GenerationConfig(max_new_tokens=6, seed=SEED)
    out, err = io.StringIO(), io.StringIO()
    r = cls(model, tok, settings, input_fn=script(lines), out=out, err=err, **kw)
    r.run()
    return r, out.getvalue(), err.getvalue()


def sample_py(args, stdin: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), *args], input=stdin, cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_interactive_session_survives_bad_settings_and_never_overwrites(run_dir, tmp_path):
    """Through stdin as a user types: bad /set values, a prompt, /save onto an existing file."""
    mine, t = tmp_path / "notes.txt", tmp_path / "t.txt"
    mine.write_text("my own notes\n")
    lines = ["/set seed 18446744073709551616", "/set num_samples 100000000", "/set num_beams 100000000",
             "/set temperature 1e-40", "ROMEO:", "/set temperature 1.5", f"/save {mine}", f"/save {tmp_path}",
             f"/save {t}", "JULIET:", "/undo", "/retry", f"/save! {t}"]  # fmt: skip
    args = [f"ckpt={run_dir}", "mode=interactive", "device=cpu", "max_new_tokens=5", "history_file=null"]
    r = sample_py(args, "\n".join(lines) + "\n", tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "error: seed=18446744073709551616 is out of range" in r.stderr
    assert "error: num_samples=100000000 needs about" in r.stderr and "lower num_beams" in r.stderr
    assert "temperature = 1e-40" in r.stderr
    assert f"error: {mine} exists; /save! {mine} replaces it" in r.stderr
    assert mine.read_text() == "my own notes\n" and "is a directory" in r.stderr
    greedy = GenerationConfig(max_new_tokens=5, temperature=0.0)
    loaded = load(run_dir)
    model, tok = loaded.build(), loaded.tokenizer
    [reply] = generate_text(model, tok, tok.encode("ROMEO:"), greedy)
    assert f">>> {reply}\n" in r.stdout  # the session went on: the prompt after the bad /sets was answered
    final = t.read_text()
    assert r.stderr.count("saved 1 turns") == 2 and ">>> ROMEO:\n" in final and ">>> JULIET" not in final
    assert not final.split(">>> ROMEO:\n")[1].startswith(reply)  # /retry replaced the greedy reply


def test_a_failed_chat_message_leaves_the_conversation_as_it_was(run_dir, tmp_path):
    lines = ["ROMEO", "caf\u00e9 \U0001f600", "/set top_p 7", "JULIET", f"/save {tmp_path / 'c'}"]
    chat, out, err = session(run_dir, ChatRepl, lines, settings=GenerationConfig(max_new_tokens=5, seed=SEED))
    assert "error: character" in err and "error: top_p=7.0 is out of range" in err
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["ROMEO", "JULIET"]
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    assert out.count("Assistant:") == 2  # both good messages were answered
    saved = json.loads((tmp_path / "c.jsonl").read_text())  # /save FILE adds .jsonl
    assert saved["messages"] == chat.messages


def test_chat_save_is_messages_jsonl_that_reads_back_exactly(run_dir, tmp_path):
    """A typed line beginning ``Assistant:`` stays the user's text; SFT's reader gets it back."""
    target = tmp_path / "talk.jsonl"
    target.write_text("keep me\n")
    tricky = "Assistant: JULIET? \\nUser: no"  # \n: a line break inside the message
    lines = [tricky, f"/save {target}", f"/save! {target}"]
    chat, _, err = session(run_dir, ChatRepl, lines, system="Be brief.")
    assert f"error: {target} exists" in err
    dialogs, _ = read_dialogs(target)
    assert dialogs[0].messages == chat.history(whole=True)
    assert dialogs[0].messages[1] == {"role": "user", "content": tricky}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def special_files(tmp_path: Path, suffix: str) -> dict[str, Path]:
    """A symlink to a file, a dangling symlink, a FIFO and (where we may make one) a character device,
    each named NAME + suffix."""
    (tmp_path / "real.txt").write_text("keep me\n")
    made = {name: tmp_path / (name + suffix) for name in ("link", "dangling", "fifo")}
    made["link"].symlink_to(tmp_path / "real.txt")
    made["dangling"].symlink_to(tmp_path / "nowhere")
    os.mkfifo(made["fifo"])
    try:  # root (e.g. in a container) may make a device node: /dev/null's numbers
        os.mknod(tmp_path / ("null" + suffix), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made["device"] = tmp_path / ("null" + suffix)
    except (PermissionError, AttributeError):
        pass
    return made


@pytest.mark.parametrize("cls, suffix", [(Repl, ""), (ChatRepl, ".jsonl")])
def test_save_never_replaces_a_symlink_fifo_or_device_nor_writes_beside_a_directory(
    run_dir, tmp_path, cls, suffix
):
    """/save! onto a symlink, a FIFO or a device node is refused (the atomic rename would put a
    regular file in its place); /save DIR and /save DIR/ are refused, with no DIR.jsonl beside it and
    no hidden DIR/.jsonl inside. The chat's /save adds .jsonl: /save! link means link.jsonl."""
    made = special_files(tmp_path, suffix)
    before = {name: os.lstat(path) for name, path in made.items()}
    (tmp_path / "d").mkdir()
    lines = ["ROMEO"] + [f"/save! {tmp_path / name}" for name in ("link", "dangling", "fifo")]
    lines += [f"/save! {made['device']}"] if "device" in made else []
    lines += [f"/save {tmp_path / 'd'}", f"/save {tmp_path / 'd'}/", f"/save! {tmp_path / 'd'}/"]
    _, _, err = session(run_dir, cls, lines)
    assert err.count("is not a regular file") == len(made) and "saved" not in err, err
    assert err.count("is a directory; give a file name") == 3
    for name, path in made.items():  # each is what it was: the same inode, the same kind
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode) == (before[name].st_ino, before[name].st_mode), name
    assert (tmp_path / "real.txt").read_text() == "keep me\n"
    assert list((tmp_path / "d").iterdir()) == [] and not (tmp_path / "d.jsonl").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_chat_retry_undo_and_system(run_dir):
    lines = ["ROMEO", "JULIET", "/retry", "/undo", "/system Be brief.", "/undo", "/undo", "/retry"]
    chat, out, err = session(run_dir, ChatRepl, lines)
    assert out.count("Assistant:") == 3 and "nothing to undo" in err and "nothing to retry" in err
    assert chat.messages == [] and chat.transcript == [] and chat.system == "Be brief."
    chat2, out2, _ = session(run_dir, ChatRepl, ["ROMEO", "JULIET", "/retry"])
    replies = [line for line in out2.splitlines() if line.startswith("Assistant:")]
    assert chat2.messages[-1]["content"] == replies[2].removeprefix("Assistant:").strip()
    assert len(chat2.messages) == 4 and replies[2] != replies[1]
    # a /retry that cannot render (the new system prompt has a character the vocabulary lacks)
    chat3, _, err3 = session(run_dir, ChatRepl, ["ROMEO", "/system caf\u00e9", "/retry"])
    assert "error: character" in err3 and len(chat3.messages) == 2 and len(chat3.transcript) == 1


def test_ctrl_c_keeps_the_partial_reply_marked(run_dir, tmp_path):
    class Interrupting(io.StringIO):
        interrupted = False

        def write(self, s):  # Ctrl-C once two pieces of the reply are shown
            if not self.interrupted and len(self.getvalue()) > len("Assistant:") + 1:
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(s)

    loaded = load(run_dir)
    model, tok = loaded.build(), loaded.tokenizer
    chat = ChatRepl(model, tok, GenerationConfig(max_new_tokens=30, temperature=2.0, top_k=0, seed=2),
                    input_fn=script(["ROMEO", f"/save {tmp_path / 'p'}"]), out=Interrupting(),
                    err=io.StringIO())  # fmt: skip
    chat.run()
    [user, reply] = json.loads((tmp_path / "p.jsonl").read_text())["messages"]
    assert reply["interrupted"] is True and reply["content"] and len(chat.transcript[0][1][0].ids) < 30


def test_chat_reuses_its_kv_cache_with_the_same_replies(run_dir):
    """Greedy chat with and without the kept cache: identical replies; each later turn runs only the
    tokens the last one did not; when old turns are dropped to fit, the common prefix is reused."""
    lines = ["ROMEO", "JULIET", "Ay me", "But soft", "what light", "yonder", "window", "breaks"]
    settings = GenerationConfig(max_new_tokens=4, temperature=0.0)
    reused = []

    class Recording(ChatRepl):
        def on_reply(self, text, completions):
            reused.append(self._decoder.reused if self._decoder else None)
            super().on_reply(text, completions)

    kept, out_kept, err = session(run_dir, Recording, lines, settings=settings, system="Be brief.")
    fresh, out_fresh, _ = session(run_dir, ChatRepl, lines, settings=settings, reuse_cache=False,
                                  system="Be brief.")  # fmt: skip
    assert out_kept == out_fresh and kept.messages == fresh.messages
    assert "oldest turns to fit the context of 96" in err  # the history overflowed along the way
    assert reused[0] == 0 and all(n > 0 for n in reused[1:])
    assert max(reused) > len(kept.tokenizer.encode("System: Be brief."))  # more than the system prompt


def test_tiny_temperature_is_finite_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, -float("inf")], [0.5, 0.1, 0.2, 0.0]])
    for t in (1e-40, 1e-300, 5e-324):
        cfg = GenerationConfig(temperature=t, top_p=0.9)
        assert choose_next(logits, cfg, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    wide = choose_next(logits, GenerationConfig(temperature=1e300, top_k=0), torch.Generator())
    assert wide[0].item() != 3  # -inf stays impossible at any temperature


def test_seed_bounds_are_torch_generator_bounds():
    GenerationConfig(seed=2**64 - 1)
    torch.Generator().manual_seed(2**64 - 1)
    with pytest.raises(Exception, match=r"seed=18446744073709551616 is out of range"):
        GenerationConfig(seed=2**64)


def prompt_cfg(name) -> SampleConfig:
    return SampleConfig(prompt_file=name)


def test_prompt_file_reads_stdin_pipes_and_devices(tmp_path):
    assert read_prompt(prompt_cfg("-"), stdin=io.BytesIO(b"ROMEO: ay")) == "ROMEO: ay"
    assert read_prompt(prompt_cfg("/dev/null")) == ""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("from a pipe"))
    writer.start()
    assert read_prompt(prompt_cfg(str(fifo))) == "from a pipe"
    writer.join()
    with pytest.raises(DataError, match="is a directory"):
        read_prompt(prompt_cfg(str(tmp_path)))
    with pytest.raises(DataError, match="no such file"):
        read_prompt(prompt_cfg(str(tmp_path / "nope.txt")))


def test_sample_py_reads_the_prompt_from_a_pipe(run_dir, tmp_path):
    r = sample_py([f"ckpt={run_dir}", "prompt_file=-", "device=cpu", "max_new_tokens=3"], "JULIET:", tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("JULIET:"), r.stderr


def test_an_existing_path_with_glob_characters_is_that_file(tmp_path):
    odd = tmp_path / "notes [draft]?.txt"
    odd.write_text("hello\n")
    (tmp_path / "notes d.txt").write_text("a glob would match me\n")
    assert input_files(odd) == [odd]
    folder = tmp_path / "set[1]"
    folder.mkdir()
    (folder / "a.txt").write_text("x\n")
    assert input_files(folder) == [folder / "a.txt"]
    assert input_files(tmp_path / "notes ?.txt") == [tmp_path / "notes d.txt"]  # a pattern still globs


def test_repl_notes_undecodable_input_and_goes_on(run_dir, tmp_path):
    bad = "ROMEO \udce9"  # what input() returns for the byte 0xE9 with surrogateescape
    repl, out, err = session(run_dir, Repl, [bad, "ROMEO", f"/save {tmp_path / 's.txt'}"])
    assert "not valid UTF-8" in err and "U+FFFD" in err  # noted, then refused by the char vocabulary
    assert [prompt for prompt, _ in repl.transcript] == ["ROMEO"] and (tmp_path / "s.txt").is_file()
    repl.write(tmp_path / "odd.txt", "text \udce9 kept", 1)  # a lone surrogate never leaves a 0-byte file
    assert (tmp_path / "odd.txt").read_text() == "text ? kept"
