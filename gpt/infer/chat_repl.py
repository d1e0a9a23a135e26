"""The chat loop (``python sample.py mode=chat``): a conversation with an instruction-tuned model,
rendered by ``gpt.chat_template`` exactly as in training.

    python sample.py mode=chat ckpt=out/chat           # /help: /system TEXT, /reset, /save FILE
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from gpt.chat_template import MARKERS, fit_history
from gpt.config import unescape
from gpt.errors import DataError
from gpt.infer.generate import Completion, Generation
from gpt.infer.repl import Repl
from gpt.tokenizer import EOT_TURN


class ChatRepl(Repl):
    """The chat loop (``mode=chat``): keeps the conversation, renders it with ``gpt.chat`` exactly as
    in training, streams each reply until end-of-turn, and drops the oldest exchanges (never the
    system prompt) when the conversation outgrows the context."""

    prompt = "User: "
    continuation = "... "
    empty_line_generates = False
    reply_prefix = "Assistant:"
    banner = "chat mode: type a message and press Enter; /help lists the commands, Ctrl-D exits"
    help = """commands:
  /system TEXT         set the system prompt (/system alone removes it); the conversation goes on
  /reset               start a new conversation (the system prompt stays)
  /save FILE           write the conversation as a dialog: FILE.jsonl as JSONL, else as a transcript
  /settings, /set KEY VALUE, /reset settings, /help, /quit (or Ctrl-D): as in interactive mode
Ctrl-C stops a reply. End a line with \\ to continue the message on the next one."""

    def __init__(self, *args, system: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.system = system or None
        self.messages: list[dict[str, str]] = []  # the whole conversation's user and assistant turns
        self.start = 0  # messages[start:] still fit the context

    def history(self, whole: bool = False) -> list[dict[str, str]]:
        """The system prompt and the turns the model sees (``whole``: every turn, for /save)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages[0 if whole else self.start :]

    def prompt_ids(self, text: str) -> list[int]:
        block_size = self.model.config.block_size
        room = block_size - min(self.settings.max_new_tokens, block_size // 4)  # keep room to reply
        self.messages.append({"role": "user", "content": text})
        ids, dropped = fit_history(self.tokenizer, self.history(), room)
        if len(ids) > room:
            self.messages.pop()
            raise DataError(
                f"the message (with the system prompt) takes {len(ids)} tokens, more than the {room} "
                f"that the context of {block_size} leaves; shorten it or lower max_new_tokens"
            )
        if dropped:
            self.start += dropped
            self.note(f"note: dropped the {dropped} oldest turns to fit the context of {block_size} tokens")
        return ids

    def stop_token_ids(self) -> Sequence[int]:
        return (self.tokenizer.special_id(EOT_TURN), self.tokenizer.eot_id)

    def on_reply(self, text: str, completions: list[Completion]) -> None:
        super().on_reply(text, completions)
        reply = completions[0].text.strip()
        if reply:
            self.messages.append({"role": "assistant", "content": reply})
        else:  # an empty turn cannot be rendered back: forget the unanswered message
            self.messages.pop()

    def reset(self) -> None:
        super().reset()
        self.messages.clear()
        self.start = 0

    def command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        if name == "/reset" and not rest.strip():
            self.reset()
            self.note("new conversation" + (" (the system prompt stays)" if self.system else ""))
            return True
        if name != "/system":
            return super().command(line)
        self.system = unescape(rest.strip()) or None
        self.note(f"system prompt: {self.system!r}" if self.system else "system prompt removed")
        return True

    def save(self, path: str) -> None:
        if not path:
            self.note("usage: /save FILE")
            return
        messages = self.history(whole=True)
        if path.endswith(".jsonl"):
            text = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
        else:
            text = "\n".join(f"{MARKERS[m['role']]} {m['content']}" for m in messages) + "\n"
        try:
            Path(path).expanduser().write_text(text, encoding="utf-8")
        except OSError as e:
            self.note(f"error: cannot write {path}: {e.strerror or e}")
            return
        self.note(f"saved {len(messages)} turns to {path}")

    def reply_once(self, text: str) -> None:
        """Single-shot chat (``sample.py mode=chat prompt=...``): print just the reply."""
        gen = Generation(self.model, self.tokenizer, self.prompt_ids(text), self.settings,
                         stop_token_ids=self.stop_token_ids(), generator=self.generator)  # fmt: skip
        started = False
        for row, piece in gen:
            if row == 0 and (started or piece.strip()):
                self.out.write(piece if started else piece.lstrip())
                self.out.flush()
                started = True
        self.out.write("\n")
        self.out.flush()
