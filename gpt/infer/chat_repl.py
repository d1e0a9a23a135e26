"""The chat loop (``python sample.py mode=chat``): a conversation with an instruction-tuned model,
rendered by ``gpt.chat_template`` exactly as in training.

    python sample.py mode=chat ckpt=out/chat           # /help: /system, /retry, /undo, /save FILE
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gpt.chat_template import fit_history
from gpt.errors import DataError
from gpt.infer.config import unescape
from gpt.infer.engine import Decoder
from gpt.infer.generate import Completion, Generation
from gpt.infer.repl import Repl
from gpt.infer.tools import ToolBox, ToolRunner, reply_messages
from gpt.tokenizer import EOT_TURN


class ChatRepl(Repl):
    """The chat loop (``mode=chat``): keeps the conversation, renders it with ``gpt.chat_template``
    exactly as in training, streams each reply until end-of-turn, and drops the oldest exchanges
    (never the system prompt) when the conversation outgrows the context. The KV cache of the
    conversation is kept between turns: each turn runs only the tokens the last one did not."""

    prompt = "User: "
    empty_line_generates = False
    reply_prefix = "Assistant:"
    banner = "chat mode: type a message and press Enter; /help lists the commands, Ctrl-D exits"
    help = """commands:
  /system TEXT         set the system prompt (/system alone removes it); the conversation goes on
  /retry               a new reply to the last message;  /undo: forget the last exchange
  /reset               start a new conversation (the system prompt stays)
  /save FILE           write the conversation as messages JSONL (what SFT reads) to a new FILE.jsonl;
                       /save! FILE replaces it
  /settings, /set KEY VALUE, /reset settings, /help, /quit (or Ctrl-D): as in interactive mode
Ctrl-C stops a reply (the part shown stays, marked "interrupted" in /save). End a line with \\ to
continue the message on the next one."""

    def __init__(self, *args, system: str | None = None, reuse_cache: bool = True,
                 tools: ToolBox | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.system = system or None
        # tools run where the model writes our call tokens (a model's own Jinja template: not here)
        usable = self.tokenizer.has_tools and self.tokenizer.chat_template is None
        self.runner = ToolRunner(self.tokenizer, tools) if tools and usable else None
        self.messages: list[dict[str, Any]] = []  # the whole conversation's user and assistant turns
        self.start = 0  # messages[start:] still fit the context
        self._dropping = 0  # exchanges the pending turn drops (committed with its reply)
        self.reuse_cache = reuse_cache
        self._decoder: Decoder | None = None

    def history(self, whole: bool = False) -> list[dict[str, Any]]:
        """The system prompt and the turns the model sees (``whole``: every turn, for /save)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages[0 if whole else self.start :]

    def prompt_ids(self, text: str) -> list[int]:
        """The rendered conversation with ``text`` as the next user turn; changes nothing (the turn
        is recorded by on_reply once its reply exists), so a message that fails leaves no trace."""
        block_size = self.model.config.block_size
        room = block_size - min(self.settings.max_new_tokens, block_size // 4)  # keep room to reply
        history = [*self.history(), {"role": "user", "content": text}]
        ids, dropped = fit_history(self.tokenizer, history, room)
        if dropped:  # drop down to 2/3 of the room: the next turns extend this prompt (and reuse its
            # cache) instead of dropping one exchange, and so changing the prompt's start, every turn
            ids, dropped = fit_history(self.tokenizer, history, room * 2 // 3)
        if len(ids) > room:
            raise DataError(
                f"the message (with the system prompt) takes {len(ids)} tokens, more than the {room} "
                f"that the context of {block_size} leaves; shorten it or lower max_new_tokens"
            )
        self._dropping = dropped
        return ids

    def stop_token_ids(self) -> Sequence[int]:
        return (self.tokenizer.special_id(EOT_TURN), self.tokenizer.eot_id)

    def decoder(self) -> Decoder | None:
        """The conversation's decoder (one row, its cache kept across turns), or None to use a fresh
        one (several samples or beams, or reuse turned off)."""
        s = self.settings
        if not self.reuse_cache or s.num_samples != 1 or s.num_beams != 1:
            return None
        if self._decoder is None or self._decoder_shift != s.context_shift:
            self._decoder, self._decoder_shift = Decoder(self.model, 1, s.context_shift), s.context_shift
        return self._decoder

    def tools(self) -> ToolRunner | None:
        return self.runner

    def on_reply(self, text: str, completions: list[Completion]) -> bool:
        completion = completions[0]
        reply = completion.text.strip()
        if self.tokenizer.has_tools and self.tokenizer.chat_template is None:
            # calls and their results become assistant tool_calls and tool messages (what /save writes)
            messages = reply_messages(self.tokenizer, completion.ids)
            reply = "called a tool" if len(messages) > 1 else messages[-1]["content"]
        else:
            messages = [{"role": "assistant", "content": reply}]
        if not reply:  # an empty turn cannot be rendered back: forget the unanswered message
            self.note("note: the reply was empty; the message is not kept in the conversation")
            return False
        super().on_reply(text, completions)
        if self._dropping:
            self.start += self._dropping
            self.note(f"note: dropped the {self._dropping} oldest turns to fit the context of "
                      f"{self.model.config.block_size} tokens")  # fmt: skip
        if completion.finish_reason == "interrupted":
            messages[-1]["interrupted"] = True  # a partial reply (Ctrl-C), kept as shown
        self.messages += [{"role": "user", "content": text}, *messages]
        return True

    def reset(self) -> None:
        super().reset()
        self.messages.clear()
        self.start = 0

    def undo(self) -> str | None:
        """Forget the last exchange; returns its user message (None when there is none)."""
        if not self.messages:
            return None
        super().undo()
        last = max(k for k, m in enumerate(self.messages) if m["role"] == "user")  # with its whole reply
        user = self.messages[last]
        del self.messages[last:]
        self.start = min(self.start, len(self.messages))
        return user["content"]

    def snapshot(self) -> Any:
        return super().snapshot(), list(self.messages), self.start

    def restore(self, saved: Any) -> None:
        transcript, self.messages, self.start = saved
        super().restore(transcript)

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

    def save(self, path: str, force: bool = False) -> None:
        """The conversation as one line of messages JSONL: ``python train.py experiment=sft
        data.path=FILE.jsonl`` reads it as is, and any text (``Assistant:`` typed by the user too)
        comes back exactly."""
        # .jsonl: gpt.data reads .jsonl files as messages; any other name as plain text
        target = self.target(path, force, suffix=".jsonl")
        if target is None:
            return
        messages = self.history(whole=True)
        self.write(target, json.dumps({"messages": messages}, ensure_ascii=False) + "\n", len(messages))

    def reply_once(self, text: str) -> None:
        """Single-shot chat (``sample.py mode=chat prompt=...``): print just the reply."""
        gen = Generation(self.model, self.tokenizer, self.prompt_ids(text), self.settings,
                         stop_token_ids=self.stop_token_ids(), generator=self.generator,
                         drafter=self.drafter, tools=self.runner)  # fmt: skip
        started = False
        for row, piece in gen:
            if row == 0 and (started or piece.strip()):
                self.out.write(piece if started else piece.lstrip())
                self.out.flush()
                started = True
        self.out.write("\n")
        self.out.flush()
