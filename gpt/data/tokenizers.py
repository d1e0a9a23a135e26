"""Which tokenizer a data preset gets: the dispatch on ``data.tokenizer`` (char and BPE are built from
the corpus, GPT-2's ranks ship in ``data/gpt2/``, a Hugging Face directory's tokenizer.json or
vocab.json + merges.txt is read by ``gpt.interop.hf_vocab``), and the training of a byte-level BPE on
the corpus (rustbpe).

    tokenizer = build_tokenizer("bpe", lambda: iter_documents(cfg), vocab_size=4096)
    tokenizer = train_bpe(texts, vocab_size=4096, max_bytes=100 << 20)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from gpt.errors import ConfigError, DataError
from gpt.interop.hf_vocab import hf_tokenizer
from gpt.tokenizer import KINDS, NEW_SPECIALS, TiktokenTokenizer, Tokenizer, char_tokenizer
from gpt.tokenizer_load import gpt2_tokenizer

log = logging.getLogger("gpt.tokenizer")

# rustbpe holds `buffer_size` pieces in memory at once; capping the piece length bounds that buffer
# (~64M characters) however the corpus is laid out (one giant string or millions of small documents).
_TRAIN_PIECE_CHARS = 1 << 16
_TRAIN_BUFFER_PIECES = 1024


def build_tokenizer(kind: str, texts_factory: Callable[[], Iterable[str]], vocab_size: int = 4096,
                    path: str | None = None, max_train_bytes: int | None = None) -> Tokenizer:  # fmt: skip
    """The data pipeline's dispatch on ``data.tokenizer``. ``texts_factory()`` yields the corpus and is
    called only for "char" and "bpe"; ``path`` is a rank file ("gpt2") or a directory ("hf")."""
    if kind == "char":
        return char_tokenizer(texts_factory())
    if kind == "bpe":
        return train_bpe(texts_factory(), vocab_size, max_bytes=max_train_bytes)
    if kind == "gpt2":
        return gpt2_tokenizer(path)
    if kind == "hf":
        if not path:
            raise ConfigError("data.tokenizer=hf needs data.tokenizer_path: a Hugging Face model directory "
                              "with tokenizer.json, or with vocab.json and merges.txt")  # fmt: skip
        return hf_tokenizer(path)
    raise ConfigError(f"data.tokenizer={kind!r} is not a tokenizer kind; use one of {', '.join(KINDS)}")


def train_bpe(texts: Iterable[str], vocab_size: int, max_bytes: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer with rustbpe on ``texts`` (streamed; at most ``max_bytes``
    UTF-8 bytes of them when given). ``vocab_size`` includes the special tokens."""
    import rustbpe  # only needed for training; keeps importing this module cheap

    n_special = len(NEW_SPECIALS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + n_special:
        raise ConfigError(
            f"data.vocab_size={vocab_size!r} is too small for a byte-level BPE tokenizer: it must be an "
            f"integer >= {256 + n_special} (256 byte tokens + {n_special} special tokens)"
        )
    seen = [0]  # bytes fed to rustbpe, counted by the generator
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(_training_pieces(texts, max_bytes, seen), vocab_size - n_special,
                                buffer_size=_TRAIN_BUFFER_PIECES)  # fmt: skip
    if seen[0] == 0:
        raise DataError("cannot train a BPE tokenizer: the corpus is empty")
    ranks = {bytes(b): int(r) for b, r in trainer.get_mergeable_ranks()}
    if len(ranks) + n_special < vocab_size:
        log.warning("BPE training found only %d merges in the corpus: vocab_size is %d, not the requested %d",
                    len(ranks) - 256, len(ranks) + n_special, vocab_size)  # fmt: skip
    specials = {s: len(ranks) + i for i, s in enumerate(NEW_SPECIALS)}
    return TiktokenTokenizer("bpe", ranks, trainer.get_pattern(), specials)


def _training_pieces(texts: Iterable[str], max_bytes: int | None, seen: list[int],
                     piece_chars: int = _TRAIN_PIECE_CHARS) -> Iterator[str]:  # fmt: skip
    """Stream texts to rustbpe in pieces of at most ``piece_chars`` characters, stopping after
    ``max_bytes`` UTF-8 bytes; ``seen[0]`` counts the bytes fed. Long texts are cut just after a newline
    followed by a non-space character: the GPT-4 split pattern never joins a chunk across such a point,
    so the cuts do not change what is learned."""
    for text in texts:
        start, n = 0, len(text)
        while start < n:
            end = min(start + piece_chars, n)
            if end < n:
                lo = start + piece_chars // 2
                cut = text.rfind("\n", lo, end - 1)
                while cut != -1 and text[cut + 1].isspace():
                    cut = text.rfind("\n", lo, cut)
                end = end if cut == -1 else cut + 1  # no good cut point: an (almost harmless) hard cut
            piece, start = text[start:end], end
            data = piece.encode("utf-8", "replace")  # "replace": lone surrogates, which rustbpe rejects
            if max_bytes is not None and seen[0] + len(data) >= max_bytes:
                data = data[: max_bytes - seen[0]]
                piece, start = data.decode("utf-8", "ignore"), n
            elif not piece.isascii():
                piece = data.decode("utf-8")
            if piece:
                seen[0] += len(data)
                yield piece
            if max_bytes is not None and seen[0] >= max_bytes:
                return
