"""Corpora as the field publishes them: gzip/zstd-compressed text and JSONL, and Parquet files.

    with open_stream(Path("dump.jsonl.zst")) as (stream, raw):   # raw.tell(): compressed bytes read
        for line in stream: ...
    units = parquet_row_groups(Path("000.parquet"), "text")       # [(row_group, bytes), ...]
    for text, nbytes in parquet_documents(Path("000.parquet"), 0, "text"): ...

Parquet needs ``pyarrow`` and ``.zst`` needs ``zstandard`` (``pip install -e .[data]``); both are
imported only when such a file is read. Parquet is read one row group at a time, in record batches,
never a whole file. A corrupt or truncated file raises ``DataError`` naming it (and the row group or
line), so that the caller can drop whatever it had half-written.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gpt.errors import DataError

# how a name ends -> (container, content); the content decides how the text is split into documents
SUFFIXES = {".txt": (None, "txt"), ".jsonl": (None, "jsonl"), ".parquet": ("parquet", "parquet"),
            ".txt.gz": ("gz", "txt"), ".jsonl.gz": ("gz", "jsonl"),
            ".txt.zst": ("zst", "txt"), ".jsonl.zst": ("zst", "jsonl")}  # fmt: skip
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time within a row group


def file_kind(path: Path) -> tuple[str | None, str] | None:
    """(container, content) of an input file by its name, None for a file that is not an input."""
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):  # ".jsonl.gz" before ".gz"-less ".jsonl"
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def _missing(module: str, path: Path) -> DataError:
    return DataError(f"{path} needs the Python package {module}; install it with pip install -e .[data]")


def corrupt(path: Path, where: str, e: BaseException) -> DataError:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DataError(
        f"{path}{where}: corrupt or truncated file ({detail}); re-download it or remove it from data.path"
    )


# errors a broken compressed stream raises while it is read
def stream_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
    with contextlib.suppress(ImportError):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


@contextlib.contextmanager
def open_stream(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(decompressed binary stream, the raw file): ``raw.tell()`` counts the file bytes consumed so
    far, which the val split and the progress bar measure the input in."""
    container = (file_kind(path) or (None, "txt"))[0]
    with open(path, "rb") as raw:
        if container is None:
            yield raw, raw
        elif container == "gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, raw  # type: ignore[misc]
        elif container == "zst":
            try:
                import zstandard
            except ImportError:
                raise _missing("zstandard", path) from None
            with io.BufferedReader(_ZstdReader(raw, zstandard.ZstdDecompressor()), 1 << 16) as stream:
                yield stream, raw  # type: ignore[misc]
        else:
            raise ValueError(f"{path}: not a stream container: {container}")


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a zstd file of one or more frames; a file that ends inside a frame
    raises EOFError (zstandard's own stream reader returns the bytes so far without a word)."""

    def __init__(self, raw: BinaryIO, dctx: Any) -> None:
        self.raw, self.dctx = raw, dctx
        self.obj, self.fed, self.buf, self.pos = dctx.decompressobj(), False, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self.pos == len(self.buf):
            data = self.raw.read(1 << 16)
            if not data:
                if self.fed and not self.obj.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            out = []
            while data:
                if self.obj.eof:  # the next frame
                    self.obj, self.fed = self.dctx.decompressobj(), False
                out.append(self.obj.decompress(data))
                self.fed = True
                data = self.obj.unused_data if self.obj.eof else b""
            self.buf, self.pos = b"".join(out), 0
        n = min(len(b), len(self.buf) - self.pos)
        b[:n] = self.buf[self.pos : self.pos + n]
        self.pos += n
        return n


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", path) from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid, OSError: a file that is not (or no longer) Parquet
        raise corrupt(path, "", e) from None


def parquet_row_groups(path: Path, text_field: str) -> list[tuple[int, int]]:
    """(row group index, its compressed bytes) of each non-empty row group, after checking that the
    file has the text column as strings."""
    pf = _parquet_file(path)
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f'{path}: no column "{text_field}" (columns: {", ".join(schema.names)}); set '
                        "data.text_field to the column that holds each document's text")  # fmt: skip
    import pyarrow as pa

    tp = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or is_view(tp)):
        raise DataError(f'{path}: column "{text_field}" holds {tp}, not text; set data.text_field')
    md, out = pf.metadata, []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        if rg.num_rows:
            out.append((i, sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))))
    return out


def parquet_documents(path: Path, row_group: int, text_field: str, nbytes: int) -> Iterator[tuple[str, int]]:
    """(text, bytes) of each non-empty document of one row group: the row group's ``nbytes`` are
    spread over its rows (an empty or null row's share goes to the next document)."""
    pf = _parquet_file(path)
    n_rows, row, counted = pf.metadata.row_group(row_group).num_rows, 0, 0
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[row_group], columns=[text_field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # ArrowInvalid, OSError: a damaged page or a truncated file
            raise corrupt(path, f": row group {row_group}", e) from None
        for text in batch.column(0).to_pylist():
            row += 1
            if text:
                share = nbytes * row // n_rows - counted
                counted += share
                yield text, share
