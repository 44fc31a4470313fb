"""Checked, streaming access to an ontology file: exists, not empty, not binary, UTF-8.

Every loader goes through here so that every format reports a missing file, an empty file,
binary data and bad UTF-8 the same way, with the byte offset and line where it happened.
Text is decoded in blocks of whole lines, so memory stays bounded by the block size.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from kg.errors import OntologyFormatError

#: ``progress(done_bytes, total_bytes)``, called now and then while a file is read.
Progress = Callable[[int, int], None]

BLOCK_SIZE = 1 << 20


def check_file(path: Path) -> int:
    """Return the size of ``path`` after checking it is a non-empty regular file."""
    if not path.exists():
        raise OntologyFormatError("no such file", path=str(path))
    if not path.is_file():
        raise OntologyFormatError("not a regular file", path=str(path))
    size = path.stat().st_size
    if size == 0:
        raise OntologyFormatError("empty file", path=str(path))
    return size


def check_bytes(data: bytes, path: Path, *, offset: int = 0, first_line: int = 1) -> str:
    """Decode a block of UTF-8 bytes, refusing NUL bytes (binary data) and bad encodings.

    ``offset`` and ``first_line`` place the block in the file for the error message.
    """
    error = binary_error(data, path, offset=offset, first_line=first_line)
    if error is not None:
        raise error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        bad = data[e.start : e.start + 1].hex()
        raise OntologyFormatError(
            f"not valid UTF-8 at byte offset {offset + e.start} (byte 0x{bad})",
            path=str(path),
            line=line,
        ) from None


def binary_error(
    data: bytes, path: Path, *, offset: int = 0, first_line: int = 1
) -> OntologyFormatError | None:
    """The error for a block holding a NUL byte, or None: UTF-16 / UTF-32 text (by its byte
    order mark, or ASCII with every other byte NUL) is named as such, anything else is
    binary data. ``offset`` and ``first_line`` place the block in the file."""
    nul = data.find(b"\x00")
    if nul < 0:
        return None
    encoding = _wide_encoding(data) if offset == 0 else None
    if encoding is not None:
        return OntologyFormatError(
            f"the file is {encoding} text; ontology files must be UTF-8 "
            f"(convert it, e.g. iconv -f {encoding} -t UTF-8)",
            path=str(path),
            line=1,
        )
    return OntologyFormatError(
        f"binary data (NUL byte at byte offset {offset + nul}); not a text ontology file",
        path=str(path),
        line=first_line + data.count(b"\n", 0, nul),
    )


def _wide_encoding(head: bytes) -> str | None:
    """``"UTF-16"`` or ``"UTF-32"`` when a file's first bytes are text in that encoding."""
    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16 LE, whose BOM starts it
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if head.startswith(bom):
            return name
    sample = head[:64]
    half = len(sample) // 2
    if half >= 4 and (sample[1::2].count(0) == half or sample[0::2].count(0) == half):
        return "UTF-16"  # ASCII written as UTF-16 without a byte order mark
    return None


def iter_line_blocks(
    path: Path, *, progress: Progress | None = None, block_size: int | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(number of the first line, lines)`` for consecutive blocks of the file.

    Lines come without their line break. A UTF-8 byte order mark is dropped. Raises
    :class:`OntologyFormatError` for a missing, empty, binary or non-UTF-8 file.
    """
    total = check_file(path)
    block_size = block_size or BLOCK_SIZE
    done = 0
    line_no = 1
    carry = b""
    with path.open("rb") as f:
        while True:
            chunk = f.read(block_size)
            if not chunk:
                break
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1 :]
            block = data[: cut + 1]
            if done == 0 and block.startswith(codecs.BOM_UTF8):
                block = block[3:]
                done = 3
            text = check_bytes(block, path, offset=done, first_line=line_no)
            lines = text.split("\n")
            lines.pop()  # the empty string after the final line break
            yield line_no, lines
            line_no += len(lines)
            done += len(block)
            if progress is not None:
                progress(done, total)
        if carry:
            if done == 0 and carry.startswith(codecs.BOM_UTF8):
                carry = carry[3:]
                done = 3
            text = check_bytes(carry, path, offset=done, first_line=line_no)
            yield line_no, [text]
    if progress is not None:
        progress(total, total)


def iter_lines(path: Path, *, progress: Progress | None = None) -> Iterator[str]:
    """Every line of the file with its line break, checked as in :func:`iter_line_blocks`."""
    for _, lines in iter_line_blocks(path, progress=progress):
        for line in lines:
            yield line + "\n"


class ProgressReader:
    """A binary file wrapper that reports bytes read, for parsers that pull their input."""

    def __init__(self, raw: BinaryIO, total: int, progress: Progress | None):
        self._raw = raw
        self._total = total
        self._progress = progress
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._done += len(data)
        if self._progress is not None and data:
            self._progress(self._done, self._total)
        return data
