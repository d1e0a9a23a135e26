"""Which tokenizer a data preset gets: the dispatch on ``data.tokenizer`` (char and BPE are built from
the corpus, GPT-2's ranks ship in ``data/gpt2/``, a Hugging Face vocab.json + merges.txt pair is read
by ``gpt.interop.hf_vocab``).

    tokenizer = build_tokenizer("bpe", lambda: iter_documents(cfg), vocab_size=4096)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gpt.errors import ConfigError
from gpt.interop.hf_vocab import hf_bpe_tokenizer
from gpt.tokenizer import KINDS, Tokenizer, char_tokenizer, gpt2_tokenizer, train_bpe


def build_tokenizer(
    kind: str,
    texts_factory: Callable[[], Iterable[str]],
    vocab_size: int = 4096,
    path: str | None = None,
    max_train_bytes: int | None = None,
) -> Tokenizer:
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
            raise ConfigError(
                "data.tokenizer=hf needs data.tokenizer_path: a directory with vocab.json and merges.txt"
            )
        return hf_bpe_tokenizer(path)
    raise ConfigError(f"data.tokenizer={kind!r} is not a tokenizer kind; use one of {', '.join(KINDS)}")
