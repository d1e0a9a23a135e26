"""SFT batches: rendered dialogs as padded training rows with a loss mask on the replies.

    tokenizer, train, train_eval, val = dialog_sources(cfg.data, tokenizer, block_size, seed)
    x, y = train.get(step, batch_size=16, start=0, count=16)   # y is -1 outside assistant replies

``DialogBatches`` is a pure function of (seed, step, position in the global batch), like
``gpt.data.shards.TokenWindows``, so any split over processes and micro-steps, and any resume, sees
the same batches. With ``data.packing=true``, ``PackedDialogBatches`` fills each row of block_size
with several dialogs and also returns their document ids (``x, y, doc = train.get(...)``): the model
then lets a token attend only within its own dialog, positions restarting per dialog, so packed and
padded batches of the same dialogs give the same loss and gradients, with far less padding.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from gpt.chat_template import dialog_text, fit_dialog, render_turns
from gpt.data.dialogs import Dialog, problems_error, read_dialogs, split_dialogs
from gpt.data.tokenizers import build_tokenizer
from gpt.errors import DataError, UserError
from gpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

    from gpt.config import DataConfig


class DialogBatches:
    """SFT batches of whole dialogs, one per row, right-padded; a pure function of (seed, step,
    position in the global batch), like ``gpt.data.shards.TokenWindows``.

    Epoch ``e`` shuffles the dialogs with an RNG seeded by ``(seed, e)`` and cuts them into
    ``n // batch_size`` batches (the remainder waits for a later epoch's shuffle). To spend little
    compute on padding, each run of ``group`` consecutive batches is first sorted by length, and the
    batches are then shuffled again. Every row of a global batch is padded to the batch's longest
    dialog (so any split over processes and micro-steps sees the same tensors): x with
    <|endoftext|>, y with -1 (no loss). Padding sits after a dialog's end, so causal attention never
    lets a real token see it."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seed: int, pad_id: int, group: int = 8
                 ) -> None:  # fmt: skip
        self.seed, self.pad_id, self.n, self.group = seed, pad_id, len(examples), group
        # x = ids[:-1]; y = ids[1:] where the mask of ids[1:] is set, else -1
        self.x = [np.asarray(ids[:-1], dtype=np.int64) for ids, _ in examples]
        self.y = [np.where(np.asarray(mask[1:]) == 1, ids[1:], -1).astype(np.int64) for ids, mask in examples]
        self.lengths = np.array([len(x) for x in self.x], dtype=np.int64)
        self._epoch: tuple[tuple[int, int], np.ndarray] | None = None  # the last epoch's batches

    def order(self, step: int, batch_size: int) -> np.ndarray:
        """Dialog indices of global batch ``step``: shape (batch_size,)."""
        per_epoch = max(1, self.n // batch_size)
        epoch, b = divmod(step, per_epoch)
        if self._epoch is None or self._epoch[0] != (epoch, batch_size):
            rng = np.random.default_rng([self.seed % (1 << 63), epoch])
            ids = np.resize(rng.permutation(self.n), per_epoch * batch_size)  # repeats if n < batch_size
            chunk = self.group * batch_size
            for s in range(0, len(ids), chunk):  # similar lengths side by side
                part = ids[s : s + chunk]
                ids[s : s + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
            batches = ids.reshape(per_epoch, batch_size)[rng.permutation(per_epoch)]
            self._epoch = ((epoch, batch_size), batches)
        return self._epoch[1][b]

    def get(self, step: int, batch_size: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 CPU tensors (count, L) for global-batch positions [start, start + count), where
        L <= block_size is the longest dialog of the whole global batch."""
        if not (start >= 0 and count >= 0 and start + count <= batch_size):
            raise ValueError(f"positions [{start}, {start + count}) outside a batch of {batch_size}")
        order = self.order(step, batch_size)
        rows = [[(self.x[i], self.y[i])] for i in order[start : start + count]]  # one dialog a row
        x, y, _ = pack_rows(rows, int(self.lengths[order].max()), self.pad_id)
        return x, y

    def padding_fraction(self, batch_size: int, steps: int | None = None) -> float:
        """Fraction of the (rows x width) positions of the first ``steps`` global batches (default:
        one epoch) that are padding."""
        steps = steps or max(1, self.n // batch_size)
        real = padded = 0
        for step in range(steps):
            lengths = self.lengths[self.order(step, batch_size)]
            real, padded = real + int(lengths.sum()), padded + int(lengths.max()) * batch_size
        return 1 - real / padded


def pack_rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], width: int, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x, y, doc (len(rows), width) of rows that each concatenate dialogs' (x, y): doc numbers the
    dialogs of a row 0, 1, ...; the padding after them has y = -1 and an id of its own."""
    import torch

    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), -1, dtype=np.int64)
    doc = np.full((len(rows), width), -1, dtype=np.int64)
    for r, dialogs in enumerate(rows):
        at = 0
        for d, (dx, dy) in enumerate(dialogs):
            x[r, at : at + len(dx)], y[r, at : at + len(dx)], doc[r, at : at + len(dx)] = dx, dy, d
            at += len(dx)
        doc[r, at:] = len(dialogs)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(doc)


class PackedDialogBatches(DialogBatches):
    """SFT batches of packed rows: epoch ``e`` shuffles the dialogs with an RNG seeded by
    ``(seed, e)``, fills rows of ``block_size`` positions with them in that order (each into the
    first of the last few rows with room for it), and cuts the rows into ``rows // batch_size`` batches in a
    shuffled order (the remainder waits for a later epoch). A pure function of (seed, step,
    position), like ``DialogBatches``; every row of a global batch is padded to its longest."""

    OPEN_ROWS = 16  # rows a dialog may still be packed into (see _pack)

    def __init__(self, examples: list[tuple[list[int], list[int]]], seed: int, pad_id: int, block_size: int
                 ) -> None:  # fmt: skip
        super().__init__(examples, seed, pad_id)
        self.block_size = block_size
        self._epochs: list[tuple[int, list[list[int]], np.ndarray]] = []  # (first step, rows, batch order)
        self._batch_size: int | None = None

    def _pack(self, epoch: int, batch_size: int) -> tuple[list[list[int]], np.ndarray]:
        rng = np.random.default_rng([self.seed % (1 << 63), epoch])
        # first fit over the OPEN_ROWS most recent rows: a dialog goes into the first of them with
        # room for it (a new row if none has), so short dialogs fill the gaps long ones leave
        rows: list[list[int]] = []
        open_rows: list[tuple[list[int], list[int]]] = []  # (dialogs, [positions used])
        for i in rng.permutation(self.n):
            n = int(self.lengths[i])
            row = next((r for r in open_rows if r[1][0] + n <= self.block_size), None)
            if row is None:
                row = ([], [0])
                open_rows.append(row)
                if len(open_rows) > self.OPEN_ROWS:
                    rows.append(open_rows.pop(0)[0])
            row[0].append(int(i))
            row[1][0] += n
        rows += [r[0] for r in open_rows]
        per_epoch = max(1, len(rows) // batch_size)
        picked = np.resize(np.arange(len(rows)), per_epoch * batch_size)  # repeats if rows < batch_size
        return rows, picked.reshape(per_epoch, batch_size)[rng.permutation(per_epoch)]

    def order(self, step: int, batch_size: int) -> list[list[int]]:  # type: ignore[override]
        """The dialog indices of each row of global batch ``step``."""
        if self._batch_size != batch_size:
            self._epochs, self._batch_size = [], batch_size
        while not self._epochs or self._epochs[-1][0] + len(self._epochs[-1][2]) <= step:
            first = self._epochs[-1][0] + len(self._epochs[-1][2]) if self._epochs else 0
            self._epochs.append((first, *self._pack(len(self._epochs), batch_size)))
        first, rows, batches = next(e for e in reversed(self._epochs) if e[0] <= step)
        return [rows[r] for r in batches[step - first]]

    def get(self, step: int, batch_size: int, start: int, count: int):  # type: ignore[override]
        """x, y, doc: int64 CPU tensors (count, L), L <= block_size the fullest row of the global batch."""
        if not (start >= 0 and count >= 0 and start + count <= batch_size):
            raise ValueError(f"positions [{start}, {start + count}) outside a batch of {batch_size}")
        rows = self.order(step, batch_size)
        width = max(int(self.lengths[r].sum()) for r in rows)
        return pack_rows(
            [[(self.x[i], self.y[i]) for i in r] for r in rows[start : start + count]], width, self.pad_id
        )

    def padding_fraction(self, batch_size: int, steps: int | None = None) -> float:
        if steps is None:  # one epoch
            self.order(0, batch_size)
            steps = len(self._epochs[0][2])
        real = padded = 0
        for step in range(steps):
            used = [int(self.lengths[r].sum()) for r in self.order(step, batch_size)]
            real, padded = real + sum(used), padded + max(used) * batch_size
        return 1 - real / padded


def render_all(tokenizer: Tokenizer, dialogs: list[Dialog], block_size: int, problems: list[str]
               ) -> tuple[list[tuple[list[int], list[int]]], int, int]:  # fmt: skip
    """(examples, truncated, too_long) for training with ``block_size``: a dialog longer than
    block_size + 1 tokens is cut at a turn boundary (``fit_dialog``) or, when its first exchange
    alone is too long, left out. A dialog the tokenizer cannot encode adds a problem."""
    examples, truncated, too_long = [], 0, 0
    for d in dialogs:
        try:
            ids, mask, ends = render_turns(tokenizer, d.messages)
        except UserError as e:
            problems.append(f"{d.source}: {e}")
            continue
        fitted = fit_dialog(ids, mask, ends, d.messages, block_size + 1)  # x and y are one shorter
        truncated += fitted is not None and len(fitted[0]) < len(ids)
        too_long += fitted is None
        if fitted is not None:
            examples.append(fitted)
    return examples, truncated, too_long


def dialog_sources(cfg: DataConfig, tokenizer: Tokenizer | None, block_size: int, seed: int,
                   show_progress: bool = True, batch_size: int | None = None
                   ) -> tuple[Tokenizer, DialogBatches, DialogBatches, DialogBatches | None]:  # fmt: skip
    """The ``data.format=dialogs`` hook of ``gpt.train.setup``: (tokenizer, train, train_eval, val).
    The tokenizer is the model's (init_from) or, for a fresh model, built from the dialogs' text."""
    dialogs, skipped = read_dialogs(cfg.path, cfg.separator, cfg.skip_invalid)
    train, val = split_dialogs(dialogs, cfg.val_fraction)
    if tokenizer is None:
        texts = lambda: (dialog_text(d.messages) for d in dialogs)
        tokenizer = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path,
                                    cfg.bpe_train_bytes)  # fmt: skip
    problems: list[str] = []
    train_ex, cut, too_long = render_all(tokenizer, train, block_size, problems)
    val_ex, val_cut, val_long = render_all(tokenizer, val, block_size, problems)
    if problems and not cfg.skip_invalid:
        raise problems_error(f"{len(problems)} dialog(s) cannot be encoded by the {tokenizer.kind} tokenizer",
                             problems)  # fmt: skip
    skipped += len(problems)
    if not train_ex or (val and not val_ex):
        raise DataError(f"no dialog of {cfg.path} fits block_size={block_size} (even cut after its first "
                        "exchange); use a model with a longer context or shorter dialogs")  # fmt: skip
    pad = tokenizer.eot_id

    def batches(examples: list[tuple[list[int], list[int]]], seed: int) -> DialogBatches:
        if cfg.packing:
            return PackedDialogBatches(examples, seed, pad, block_size)
        return DialogBatches(examples, seed, pad)

    sources = (batches(train_ex, seed), batches(train_ex, seed + 1))
    val_source = batches(val_ex, seed + 2) if val_ex else None
    if show_progress:
        padding = f", padding {100 * sources[0].padding_fraction(batch_size):.0f}%" if batch_size else ""
        padding += ", packed" if cfg.packing else ""
        formats = "/".join(sorted({d.format for d in dialogs}))
        print(f"dialogs: {len(train_ex)} train, {len(val_ex)} val from {cfg.path}, format {formats} "
              f"({skipped} malformed skipped; {cut + val_cut} cut at a turn boundary and "
              f"{too_long + val_long} left out for block_size={block_size}){padding}",
              file=sys.stderr, flush=True)  # fmt: skip
    return tokenizer, sources[0], sources[1], val_source
