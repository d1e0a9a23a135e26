"""Reading the user's text: files, directories and globs of .txt, .jsonl (either also as .gz or .zst)
and .parquet files, streamed in pieces.

    from gpt.data.corpus import iter_documents
    for text in iter_documents("my_corpus/", text_field="text"):
        ...

A .txt file is one document, a .jsonl line is one document (``obj[text_field]``), a Parquet row is one
document (its ``text_field`` column). Large files come in pieces of about ``CHUNK_BYTES`` (never whole
in memory), cut where BPE pre-tokenization is not affected. The input is a list of ``Unit``s (a file,
or one row group of a Parquet file) that data preparation shares out between processes. Missing,
empty, binary, corrupt and non-UTF-8 inputs raise ``DataError`` naming the file (and line or row group).
"""

from __future__ import annotations

import codecs
import glob
import json
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from gpt.data.readers import (
    corrupt,
    file_kind,
    open_stream,
    parquet_documents,
    parquet_row_groups,
    stream_errors,
)
from gpt.errors import DataError
from gpt.typed_config import resolve_path

CHUNK_BYTES = 1 << 20  # text is read and tokenized in pieces of about this many bytes
MAX_PIECE_FACTOR = 16  # a line longer than 16 chunks is cut at a character boundary instead


class Piece(NamedTuple):
    text: str
    nbytes: int  # the input-file bytes it came from (the val split and the progress bar count these)
    doc_end: bool  # the last piece of its document (an eot follows it)
    splittable: bool  # .txt text, which the train/val split may cut at a line start; documents: False


class Unit(NamedTuple):
    """The smallest piece of input one process prepares: a file, or one row group of a Parquet file."""

    file: Path
    row_group: int | None  # Parquet: the row group; None: the whole file
    nbytes: int  # its bytes in the file (a Parquet row group: compressed), what progress counts


def input_files(path: str | Path) -> list[Path]:
    """The files behind a user path: a file, a directory (its input files, recursively) or a glob."""
    p = resolve_path(path)
    if not p.exists() and any(ch in str(p) for ch in "*?["):  # an existing name is never a pattern
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        if not matches:
            raise DataError(f"no files match {path}; check the pattern (data.path)")
        return [f for m in matches for f in (input_files(m) if m.is_dir() else [m])]
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file())
        files = [f for f in found if file_kind(f) is not None]
        if not files:
            raise DataError(f"no .txt, .jsonl (or .gz/.zst of them) or .parquet files under {p}; point "
                            "data.path at your text files")  # fmt: skip
        _note_skipped(p, [f for f in found if file_kind(f) is None])
        return files
    if not p.is_file():
        raise DataError(f"{path} {_what_it_is(p)}; data.path must be a file, a directory or a glob")
    return [p]


def _what_it_is(p: Path) -> str:
    """Why a path that is not a regular file or a directory cannot be read as text."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return "not found"
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return f"is {what}, not a regular file"
    return "is not a regular file"


def _note_skipped(directory: Path, skipped: list[Path]) -> None:
    """One line on stderr for the files of a data directory that are not read (a .csv, a .md)."""
    if skipped:
        kinds = sorted({"".join(f.suffixes[-2:]) or f.name for f in skipped})
        print(f"notice: {len(skipped)} file{'s' if len(skipped) != 1 else ''} under {directory} skipped "
              f"({', '.join(kinds[:8])}{', ...' if len(kinds) > 8 else ''}); read are .txt, .jsonl (also "
              ".gz/.zst) and .parquet", file=sys.stderr)  # fmt: skip


def _check_binary(path: Path) -> None:
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise DataError(f"{path} looks binary (NUL bytes in its first 8 kB); give UTF-8 text files")


def _bad_utf8(path: Path, line: int, at: int) -> DataError:
    return DataError(f"{path}:{line}: invalid UTF-8 at byte offset {at}; convert the file to UTF-8 "
                     f"(e.g. iconv -f latin1 -t utf-8 FILE)")  # fmt: skip


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
            for m in pattern.finditer(text, lo, hi):  # noqa: B007 -- the last match is the one wanted
                pass
            if m is not None:
                return m.end()
    return len(text) if force else 0  # no line break at all: wait for more text, up to a bound


def _read(stream, n: int, path: Path, line: int) -> bytes:
    try:
        return stream.read(n)
    except stream_errors() as e:  # a compressed file cut short or damaged
        raise corrupt(path, f":{line}", e) from None


def _txt_pieces(path: Path, chunk: int) -> Iterator[Piece]:
    """A .txt file (plain or compressed) as pieces of about ``chunk`` bytes (never the whole file in
    memory). A compressed file's pieces count the compressed bytes read for them."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # holds a character split across two reads
    text, offset, line, eof = "", 0, 1, False
    with open_stream(path) as (f, raw_file):
        plain, counted = f is raw_file, 0
        while not eof:
            raw = _read(f, chunk, path, line)
            eof, held = not raw, len(decoder.getstate()[0])
            try:
                new = decoder.decode(raw, final=eof)
            except UnicodeDecodeError as e:  # e.object is the held bytes + raw
                bad_line = line + e.object.count(b"\n", 0, e.start)
                raise _bad_utf8(path, bad_line, offset - held + e.start) from None
            offset, line, text = offset + len(raw), line + new.count("\n"), text + new
            while text and (eof or len(text) >= chunk):
                cut = len(text) if eof else _cut_point(text, chunk, len(text) >= MAX_PIECE_FACTOR * chunk)
                if cut == 0:
                    break
                piece, text = text[:cut], text[cut:]
                if plain:
                    yield Piece(piece, len(piece.encode("utf-8")), eof and not text, True)
                else:
                    nbytes, counted = raw_file.tell() - counted, raw_file.tell()
                    yield Piece(piece, nbytes, eof and not text, True)


def _lines(f, path: Path) -> Iterator[bytes]:
    it, ln = iter(f), 0
    while True:
        ln += 1
        try:
            yield next(it)
        except StopIteration:
            return
        except stream_errors() as e:
            raise corrupt(path, f":{ln}", e) from None


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    """One document per JSON line; blank lines are skipped (their bytes counted with the next one)."""
    with open_stream(path) as (f, raw_file):
        plain, pending, offset, counted = f is raw_file, 0, 0, 0
        for ln, raw in enumerate(_lines(f, path), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad_utf8(path, ln, offset + e.start) from None
            offset = offset + len(raw)
            if plain:
                pending += len(raw)
            else:  # compressed: the file bytes read so far (the reader reads ahead in blocks)
                pending, counted = pending + raw_file.tell() - counted, raw_file.tell()
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid JSON ({e.msg}); fix or remove that line") from None
            doc = _text_of(doc, text_field, path, ln)
            if doc:
                yield Piece(doc, pending, True, False)
                pending = 0


def _text_of(doc: object, text_field: str, path: Path, ln: int) -> str:
    """A JSONL line's document: its ``text_field``, which must be a JSON string."""
    if isinstance(doc, dict) and text_field in doc:
        value = doc[text_field]
        if isinstance(value, str):
            return value
        kinds = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
        what = "null" if value is None else kinds.get(type(value), "not text")
        raise DataError(f'{path}:{ln}: "{text_field}" is {what}, not a JSON string; fix or remove that line')
    raise DataError(f'{path}:{ln}: no text field "{text_field}" (a JSON string); set '
                    "data.text_field to the key that holds each document's text")  # fmt: skip


def input_units(files: list[Path], text_field: str = "text") -> list[Unit]:
    """The units of ``files`` in order: one per non-empty file, one per non-empty Parquet row group
    (whose text column is checked here, before anything is prepared)."""
    units = []
    for file in files:
        size = file.stat().st_size
        if size == 0:
            continue  # one empty file among many is harmless; all of them empty is an error later
        if (file_kind(file) or (None, "txt"))[1] == "parquet":
            units += [Unit(file, i, n) for i, n in parquet_row_groups(file, text_field)]
        else:
            units.append(Unit(file, None, size))
    return units


def unit_pieces(unit: Unit, text_field: str = "text", chunk_bytes: int | None = None) -> Iterator[Piece]:
    """The pieces of one unit (see ``iter_pieces``)."""
    container, content = file_kind(unit.file) or (None, "txt")
    if content == "parquet":
        for text, nbytes in parquet_documents(unit.file, unit.row_group or 0, text_field, unit.nbytes):
            yield Piece(text, nbytes, True, False)
        return
    if container is None:
        _check_binary(unit.file)
    if content == "jsonl":
        yield from _jsonl_pieces(unit.file, text_field)
    else:
        yield from _txt_pieces(unit.file, chunk_bytes or CHUNK_BYTES)


def no_text(path: str | Path, files: list[Path]) -> DataError:
    what = f"{files[0]} is empty" if len(files) == 1 else f"the {len(files)} files of {path} hold no text"
    return DataError(f"{what}; data.path must point at some text")


def iter_pieces(path: str | Path, text_field: str = "text", chunk_bytes: int | None = None
                ) -> Iterator[Piece]:  # fmt: skip
    """Stream the input as ``Piece``s: a JSONL or Parquet document is one piece; a .txt file larger
    than ``chunk_bytes`` (default ``CHUNK_BYTES``) comes as several, each ending at a line break
    followed by non-space text, so tokenizing the pieces one by one gives the tokens of the whole file."""
    files, found = input_files(path), False
    for unit in input_units(files, text_field):
        for piece in unit_pieces(unit, text_field, chunk_bytes):
            found = True
            yield piece
    if not found:
        raise no_text(path, files)


def iter_documents(path: str | Path, text_field: str = "text", chunk_bytes: int | None = None
                   ) -> Iterator[str]:  # fmt: skip
    """Stream the documents of ``path`` (see ``input_files``); a large .txt document comes in pieces
    (see ``iter_pieces``) that join back to exactly the file's text."""
    return (piece.text for piece in iter_pieces(path, text_field, chunk_bytes))
