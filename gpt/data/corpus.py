"""Reading the user's text: files, directories and globs of .txt and .jsonl, streamed in pieces.

    from gpt.data.corpus import iter_documents
    for text in iter_documents("my_corpus/", jsonl_field="text"):
        ...

A .txt file is one document, a .jsonl line is one document (``obj[jsonl_field]``). Large files come
in pieces of about ``CHUNK_BYTES`` (never whole in memory), cut where BPE pre-tokenization is not
affected. Missing, empty, binary and non-UTF-8 inputs raise ``DataError`` naming the file (and line).
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from gpt.config import resolve_path
from gpt.errors import DataError

CHUNK_BYTES = 1 << 20  # text is read and tokenized in pieces of about this many bytes
MAX_PIECE_FACTOR = 16  # a line longer than 16 chunks is cut at a character boundary instead


class Piece(NamedTuple):
    text: str
    nbytes: int  # the input-file bytes it came from (the val split and the progress bar count these)
    doc_end: bool  # the last piece of its document (an eot follows it)
    splittable: bool  # .txt text, which the train/val split may cut at a line start; JSONL: False


def input_files(path: str | Path) -> list[Path]:
    """The files behind a user path: a file, a directory (*.txt, *.jsonl, recursively) or a glob."""
    p = resolve_path(path)
    if not p.exists() and any(ch in str(p) for ch in "*?["):  # an existing name is never a pattern
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        if not matches:
            raise DataError(f"no files match {path}; check the pattern (data.path)")
        return [f for m in matches for f in (input_files(m) if m.is_dir() else [m])]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".txt", ".jsonl") and f.is_file())
        if not files:
            raise DataError(f"no .txt or .jsonl files under {p}; point data.path at your text files")
        return files
    if not p.is_file():
        raise DataError(f"{path} not found; data.path must be a file, a directory or a glob")
    return [p]


def _check_binary(path: Path) -> None:
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise DataError(f"{path} looks binary (NUL bytes in its first 8 kB); give UTF-8 text files")


def _bad_utf8(path: Path, line: int, at: int) -> DataError:
    return DataError(
        f"{path}:{line}: invalid UTF-8 at byte offset {at}; convert the file to UTF-8 "
        f"(e.g. iconv -f latin1 -t utf-8 FILE)"
    )


# Where a piece may end, best first. Ending right after a "\n" with non-space on both sides keeps every
# BPE pre-tokenization pattern's tokens identical to tokenizing the whole text (a run of blank lines
# before the cut would tokenize differently at the end of a string with the GPT-2 pattern).
_CUTS = [re.compile(r"(?<=\S)\n(?=\S)"), re.compile(r"\n(?=\S)"), re.compile(r"\n(?=.)", re.S)]


def _cut_point(text: str, chunk: int, force: bool) -> int:
    """Where the next piece ends: the best kind of line break, the last one in the first ``chunk``
    characters if there is one there; 0 = none yet (read more text), unless ``force``."""
    for pattern in _CUTS:  # look near ``chunk`` first: scanning a whole megabyte each time is slow
        for lo, hi in ((max(0, chunk - 4096), chunk + 1), (0, chunk + 1), (0, len(text))):
            m = None
            for m in pattern.finditer(text, lo, hi):  # noqa: B007 -- we want the last match
                pass
            if m is not None:
                return m.end()
    return len(text) if force else 0  # no line break at all: wait for more text, up to a bound


def _txt_pieces(path: Path, chunk: int) -> Iterator[Piece]:
    """A .txt file as pieces of about ``chunk`` bytes (never the whole file in memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # holds a character split across two reads
    text, offset, line, eof = "", 0, 1, False
    with open(path, "rb") as f:
        while not eof:
            raw = f.read(chunk)
            eof, held = not raw, len(decoder.getstate()[0])
            try:
                new = decoder.decode(raw, final=eof)
            except UnicodeDecodeError as e:  # e.object is the held bytes + raw
                raise _bad_utf8(
                    path, line + e.object.count(b"\n", 0, e.start), offset - held + e.start
                ) from None
            offset, line, text = offset + len(raw), line + new.count("\n"), text + new
            while text and (eof or len(text) >= chunk):
                cut = len(text) if eof else _cut_point(text, chunk, len(text) >= MAX_PIECE_FACTOR * chunk)
                if cut == 0:
                    break
                piece, text = text[:cut], text[cut:]
                yield Piece(piece, len(piece.encode("utf-8")), eof and not text, True)


def _jsonl_pieces(path: Path, jsonl_field: str) -> Iterator[Piece]:
    """One document per JSON line; blank lines are skipped (their bytes counted with the next one)."""
    with open(path, "rb") as f:
        pending, offset = 0, 0
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad_utf8(path, ln, offset + e.start) from None
            offset, pending = offset + len(raw), pending + len(raw)
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid JSON ({e.msg}); fix or remove that line") from None
            doc = doc.get(jsonl_field) if isinstance(doc, dict) else None
            if not isinstance(doc, str):
                raise DataError(
                    f'{path}:{ln}: no text field "{jsonl_field}" (a JSON string); set data.jsonl_field '
                    f"to the key that holds each document's text"
                )
            if doc:
                yield Piece(doc, pending, True, False)
                pending = 0


def iter_pieces(
    path: str | Path, jsonl_field: str = "text", chunk_bytes: int | None = None
) -> Iterator[Piece]:
    """Stream the input as ``Piece``s: a JSONL document is one piece; a .txt file larger than
    ``chunk_bytes`` (default ``CHUNK_BYTES``) comes as several, each ending at a line break followed
    by non-space text, so tokenizing the pieces one by one gives the tokens of the whole file."""
    files, found = input_files(path), False
    for file in files:
        if file.stat().st_size == 0:
            continue  # one empty file among many is harmless; all of them empty is an error below
        _check_binary(file)
        if file.suffix.lower() == ".jsonl":
            pieces = _jsonl_pieces(file, jsonl_field)
        else:
            pieces = _txt_pieces(file, chunk_bytes or CHUNK_BYTES)
        for piece in pieces:
            found = True
            yield piece
    if not found:
        what = f"{files[0]} is empty" if len(files) == 1 else f"the {len(files)} files of {path} hold no text"
        raise DataError(f"{what}; data.path must point at some text")


def iter_documents(
    path: str | Path, jsonl_field: str = "text", chunk_bytes: int | None = None
) -> Iterator[str]:
    """Stream the documents of ``path`` (see ``input_files``); a large .txt document comes in pieces
    (see ``iter_pieces``) that join back to exactly the file's text."""
    for piece in iter_pieces(path, jsonl_field, chunk_bytes):
        yield piece.text
