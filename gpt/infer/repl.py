"""The interactive prompt loop of the generation engine (``python sample.py mode=interactive``).

    python sample.py mode=interactive                   # a REPL: /help, /set temperature 0.7, ...

``Repl`` is the prompt loop: readline editing and history, live settings (/set, /settings), /reset,
/save FILE, Ctrl-C stops a generation (not the program), Ctrl-D exits. A chat REPL subclasses it
and overrides its hooks: ``prompt_ids`` (a turn -> the prompt ids, e.g. the rendered conversation),
``stop_token_ids`` (e.g. end-of-turn), ``on_reply`` (append the reply to the history) and ``reset``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from gpt.atomic import atomic_write
from gpt.errors import ConfigError, UserError
from gpt.infer.config import GenerationConfig, unescape
from gpt.infer.engine import Decoder, check_memory
from gpt.infer.generate import Completion, Generation
from gpt.infer.tools import ToolRunner
from gpt.typed_config import from_dict

SEPARATOR = "---------------"  # printed on its own line between samples


def print_samples(gen: Generation, out: TextIO, prefix: str = "") -> None:
    """Stream sample 1 to ``out`` as it is generated; the others (decoded in the same batch) follow
    when it is done, each after a separator line. ``prefix`` (the prompt) starts every sample."""
    pieces = iter(gen)
    try:
        out.write(prefix)
        out.flush()
        for row, piece in pieces:
            if row == 0:
                out.write(piece)
                out.flush()
        out.write("\n")
        for completion in gen.completions[1:]:
            out.write(f"{SEPARATOR}\n{prefix}{completion.text}\n")
        out.flush()
    finally:
        pieces.close()  # also when Ctrl-C interrupts: the generator's cleanup runs now


def one_line(e: BaseException) -> str:
    """An error as one line: a user mistake's own message, else its type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}".rstrip(": ")


def settings_line(settings: GenerationConfig) -> str:
    return " ".join(f"{f.name}={getattr(settings, f.name)!r}" for f in dataclasses.fields(settings))


def parse_setting(settings: GenerationConfig, key: str, raw: str) -> GenerationConfig:
    """``settings`` with ``key`` set from the text ``raw`` (as typed after /set); ConfigError naming
    the setting if the key is unknown or the value has the wrong type or is out of range."""
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    if key not in names:
        raise ConfigError(f"unknown setting '{key}'; settings: {', '.join(names)}")
    raw = raw.strip()
    value: Any
    if key == "stop":  # one string (\n, \t understood), a JSON list of strings, or none
        if raw.lower() in ("", "none", "null", "[]"):
            value = []
        elif raw.startswith("["):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f'stop={raw}: write a list as JSON, e.g. ["\\n\\n", "THE END"]') from None
        else:
            value = [unescape(raw)]
    elif raw.lower() in ("none", "null"):
        value = None
    elif raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        value = raw
        for parse in (int, float):
            try:
                value = parse(raw)
                break
            except ValueError:
                pass
    return from_dict(GenerationConfig, {**dataclasses.asdict(settings), key: value})


class Repl:
    """The interactive prompt loop. Input and output are injectable (tests script them)."""

    prompt = ">>> "
    continuation = "... "  # a line ending in a backslash continues on the next one
    empty_line_generates = True  # an empty prompt samples from <|endoftext|> (chat: ignored)
    reply_prefix = ""  # printed before each streamed sample (chat: "Assistant:")
    banner = "interactive mode: type a prompt and press Enter; /help lists the commands, Ctrl-D exits"
    help = """commands:
  /settings            show the generation settings
  /set KEY VALUE       change one, e.g. /set temperature 0.7, /set stop \\n\\n, /set seed none
  /retry               generate the last turn again;  /undo: forget the last turn
  /reset               forget the transcript;  /reset settings: back to the starting settings
  /save FILE           write the transcript (prompts and samples) to a new FILE; /save! FILE replaces it
  /help                this list;  /quit (or Ctrl-D) exits
Ctrl-C stops a generation. End a line with \\ to continue the prompt on the next line."""

    def __init__(self, model: torch.nn.Module, tokenizer, settings: GenerationConfig, *,
                 input_fn: Callable[[str], str] | None = None, out: TextIO | None = None,
                 err: TextIO | None = None, history_file: str | Path | None = None,
                 drafter=None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.drafter = drafter  # speculative decoding (gpt.infer.speculative), kept across turns
        self.settings = self.initial_settings = settings
        self.input_fn = input_fn or input  # input() gets readline editing on a terminal
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.history_file = Path(history_file).expanduser() if history_file else None
        self.transcript: list[tuple[str, list[Completion]]] = []  # (prompt, samples) per turn
        self._readline: Any = None
        self._said_cropped = False
        # one generator for the whole session: reproducible, yet each turn draws new samples
        self.generator = torch.Generator(device=model.lm_head.weight.device)
        self._seed(settings.seed)

    # --- hooks for subclasses (the chat REPL) -------------------------------------------------------

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids to continue for what the user typed (chat: the whole rendered dialog)."""
        return self.tokenizer.encode(text)

    def stop_token_ids(self) -> Sequence[int]:
        """Tokens that end a reply (chat: end-of-turn)."""
        return ()

    def decoder(self) -> Decoder | None:
        """A decoder kept across turns, whose cache the next prompt reuses (chat); None: a fresh one."""
        return None

    def tools(self) -> ToolRunner | None:
        """What runs the calls of a reply (chat); None: calls are plain tokens."""
        return None

    def on_reply(self, text: str, completions: list[Completion]) -> bool | None:
        """Called after every turn, also an interrupted one (chat: append the reply to the history);
        False: the turn is not kept (chat: an empty reply)."""
        self.transcript.append((text, completions))
        return True

    def reset(self) -> None:
        self.transcript.clear()

    def undo(self) -> str | None:
        """Forget the last turn; returns its prompt (None when there is none)."""
        return self.transcript.pop()[0] if self.transcript else None

    # --- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        if self.input_fn is input and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes: a note in read(), not a crash
        self._start_readline()
        self.note(self.banner)
        try:
            while True:
                try:
                    line = self.read()
                except EOFError:
                    self.note("")
                    return
                except KeyboardInterrupt:
                    self.note("^C (Ctrl-D or /quit exits)")
                    continue
                try:
                    if not self.handle(line):
                        return
                except Exception as e:  # any failure ends the turn, never the session or its history
                    self.note(f"error: {one_line(e)}")
                except KeyboardInterrupt:  # Ctrl-C outside a reply (e.g. while a long prompt encodes)
                    self.note("^C (Ctrl-D or /quit exits)")
        finally:
            self._save_history()

    def read(self) -> str:
        line = self.input_fn(self.prompt)
        while line.endswith("\\"):
            line = line[:-1] + "\n" + self.input_fn(self.continuation)
        if any("\ud800" <= c <= "\udfff" for c in line):  # undecodable bytes (surrogate escapes)
            line = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in line)
            self.note("note: the line was not valid UTF-8; its undecodable bytes became U+FFFD")
        return line

    def handle(self, line: str) -> bool:
        """Act on one input line; False means exit."""
        if line.strip().startswith("/"):
            return self.command(line.strip())
        if line.strip() or self.empty_line_generates:
            self.turn(line)
        return True

    def command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.note(self.help)
        elif name == "/settings":
            for f in dataclasses.fields(self.settings):
                self.note(f"  {f.name} = {getattr(self.settings, f.name)!r}")
        elif name == "/set":
            key, _, value = rest.strip().partition(" ")
            try:
                settings = parse_setting(self.settings, key, value)
                if key in ("num_samples", "num_beams"):  # a batch that cannot fit: refused now
                    beams = settings.num_beams > 1
                    check_memory(self.model, settings.num_beams if beams else settings.num_samples, key)
            except ConfigError as e:
                self.note(f"error: {e}")
                return True
            self.settings = settings
            if key == "seed":
                self._seed(self.settings.seed)
            self.note(f"{key} = {getattr(self.settings, key)!r}")
        elif name == "/reset":
            if rest.strip() == "settings":
                self.settings = self.initial_settings
                self._seed(self.settings.seed)
                self.note("settings restored")
            else:
                self.reset()
                self.note("transcript cleared")
        elif name in ("/save", "/save!"):
            self.save(rest.strip(), force=name == "/save!")
        elif name == "/undo":
            self.note("forgot the last turn" if self.undo() is not None else "nothing to undo")
        elif name == "/retry":
            self.retry()
        else:
            self.note(f"unknown command {name}; /help lists the commands")
        return True

    def retry(self) -> None:
        """Generate the last turn again in its place (the old reply is kept if that fails)."""
        if not self.transcript:
            self.note("nothing to retry")
            return
        saved, done = self.snapshot(), False
        text = self.undo()
        assert text is not None
        try:
            done = self.turn(text)
        finally:
            if not done:
                self.restore(saved)

    def snapshot(self) -> Any:
        """What a failed /retry restores (chat: the conversation too)."""
        return list(self.transcript)

    def restore(self, saved: Any) -> None:
        self.transcript[:] = saved

    def turn(self, text: str) -> bool:
        """Generate for one prompt, streaming sample 1; Ctrl-C stops it and keeps what was shown.
        Nothing is recorded unless the reply was generated (True): a failed turn changes nothing."""
        try:
            ids = self.prompt_ids(text)
        except UserError as e:  # e.g. a character the char-level vocabulary lacks
            self.note(f"error: {e}")
            return False
        gen = Generation(
            self.model, self.tokenizer, ids, self.settings,
            stop_token_ids=self.stop_token_ids(), generator=self.generator, decoder=self.decoder(),
            drafter=self.drafter, tools=self.tools(),
        )  # fmt: skip
        if gen.dropped and not self._said_cropped:
            self._said_cropped = True
            self.note(f"note: the prompt is longer than the model's context; its first {gen.dropped} "
                      "tokens are left out (said once)")  # fmt: skip
        try:
            print_samples(gen, self.out, prefix=self.reply_prefix)
        except KeyboardInterrupt:
            for stream in gen.streams:
                stream.finish_reason = stream.finish_reason or "interrupted"
            self.out.write("\n")
            self.note("[stopped]")
        return self.on_reply(text, gen.completions) is not False

    def target(self, path: str, force: bool, suffix: str = "") -> Path | None:
        """The file /save writes (``path``, plus ``suffix`` if it lacks it), or None (with a note) when
        it names a directory, is not a regular file (the atomic rename would put a regular file in
        place of a symlink, a FIFO or a device node: never, not even with ``!``) or would replace a
        file without ``!``."""
        if not path:
            self.note("usage: /save FILE (/save! FILE replaces an existing file)")
            return None
        raw = Path(path).expanduser()
        if path.endswith(("/", os.sep)) or raw.is_dir():  # checked before the suffix: DIR/ + .jsonl
            self.note(f"error: {path} is a directory; give a file name")
            return None
        target = raw if raw.name.endswith(suffix) else raw.with_name(raw.name + suffix)
        if target.is_dir():
            self.note(f"error: {target} is a directory; give a file name")
            return None
        if os.path.lexists(target) and not stat.S_ISREG(target.lstat().st_mode):
            self.note(f"error: {target} is not a regular file (a symlink, a FIFO or a device); "
                      "/save never replaces one: choose another name")  # fmt: skip
            return None
        if target.exists() and not force:
            self.note(f"error: {target} exists; /save! {target} replaces it, or choose another name")
            return None
        return target

    def write(self, target: Path, text: str, turns: int) -> None:
        """Write atomically: a failure leaves the old file (or none), never half of one."""
        try:
            atomic_write(target, text.encode("utf-8", errors="replace"))
        except OSError as e:
            self.note(f"error: cannot write {target}: {e.strerror or e}")
            return
        self.note(f"saved {turns} turns to {target}")

    def save(self, path: str, force: bool = False) -> None:
        target = self.target(path, force)
        if target is None:
            return
        lines = [f"# gpt interactive transcript; settings: {settings_line(self.settings)}", ""]
        for prompt, completions in self.transcript:
            lines.append(self.prompt + prompt.replace("\n", "\n" + self.continuation))
            for i, completion in enumerate(completions):
                if i:
                    lines.append(SEPARATOR)
                suffix = " [stopped]" if completion.finish_reason == "interrupted" else ""
                lines.append(completion.text + suffix)
            lines.append("")
        self.write(target, "\n".join(lines) + "\n", len(self.transcript))

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def _seed(self, seed: int | None) -> None:
        self.generator.manual_seed(seed) if seed is not None else self.generator.seed()

    def _start_readline(self) -> None:
        """Line editing and history, when reading a terminal with the built-in input()."""
        if self.input_fn is not input or not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline
            return
        self._readline = readline
        readline.set_history_length(1000)
        if self.history_file and self.history_file.is_file():
            with contextlib.suppress(OSError):
                readline.read_history_file(self.history_file)

    def _save_history(self) -> None:
        if self._readline is not None and self.history_file is not None:
            with contextlib.suppress(OSError):
                self._readline.write_history_file(self.history_file)
