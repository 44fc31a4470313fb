"""A streaming ``multipart/related`` parser that spools each part to a file (RFC 2046, RFC 2387).

Starlette's form parser reads ``multipart/form-data`` only, and a STOW-RS study can be far
larger than memory, so the body of ``POST /dicomweb/studies`` goes through here: the
request stream is fed chunk by chunk to :class:`MultipartParser`, an incremental state
machine that finds the boundaries (also when one is split across chunks) and emits
:class:`PartStart` / :class:`PartData` / :class:`PartEnd` events, and
:func:`spool_multipart` writes each part's bytes to a temporary file in a spool folder,
flushing a bounded buffer (1 MiB by default) from a worker thread. Neither the body nor a
whole part is ever held in memory.

Framing follows RFC 2046 §5.1.1: the body is ``preamble, "--" boundary CRLF, part,
CRLF "--" boundary CRLF, part, ..., CRLF "--" boundary "--", epilogue``. Preamble and
epilogue are ignored; a delimiter may be followed by spaces or tabs before its CRLF; a
``CRLF--boundary`` followed by anything else is data, not a delimiter. A body that ends
before the closing delimiter is malformed (400) and its temporary files are removed.

A part whose file cannot be written (a full disk) does not fail the request: the rest of
the part is read and dropped, its temporary file is removed, and the part comes back with
:attr:`SpooledPart.error` set (and its first bytes, to name the instance in the answer).

Example::

    boundary = parse_related_content_type(request.headers.get("content-type"))
    parts = await spool_multipart(request.stream(), boundary, home / "spool")
    try:
        for part in parts:
            ...  # part.path, part.media_type, part.sha256
    finally:
        remove_spooled(parts)
"""

from __future__ import annotations

import contextlib
import email.message
import hashlib
import os
import tempfile
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio

from service.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = [
    "DICOM_MEDIA_TYPE",
    "MultipartLimits",
    "MultipartParser",
    "PartData",
    "PartEnd",
    "PartEvent",
    "PartStart",
    "SpooledPart",
    "parse_related_content_type",
    "remove_spooled",
    "spool_multipart",
]

#: The media type of a DICOM Part 10 file, the only ``type`` STOW-RS bodies may declare.
DICOM_MEDIA_TYPE = "application/dicom"
#: RFC 2046 allows 1-70 characters; a little slack for clients that exceed it.
MAX_BOUNDARY = 200
#: Longest run of transport padding (spaces, tabs) accepted after a delimiter.
MAX_PADDING = 1024
#: First bytes of a part kept when its file cannot be written, to identify the instance.
HEAD_BYTES = 64 * 1024

_CRLF = b"\r\n"
_OWS = " \t"


@dataclass(frozen=True)
class MultipartLimits:
    """Bounds on one multipart body; breaking one is a 413 (parts, bytes) or a 400 (headers).

    Args:
        max_parts: parts per body.
        max_bytes: bytes of the whole body, framing included.
        max_header_bytes: bytes of one part's header block.
        buffer_bytes: part bytes buffered in memory before they are written to the file.
    """

    max_parts: int = 10_000
    max_bytes: int = 4 * 2**30
    max_header_bytes: int = 16 * 1024
    buffer_bytes: int = 2**20

    def __post_init__(self) -> None:
        for name in ("max_parts", "max_bytes", "max_header_bytes", "buffer_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def parse_related_content_type(value: str | None, media_type: str = DICOM_MEDIA_TYPE) -> str:
    """The boundary of a ``multipart/related; type="<media_type>"; boundary=...`` header.

    The ``type`` parameter may be quoted or not; names and types compare case-insensitively.

    Raises:
        UnsupportedMediaTypeError: (415) not ``multipart/related``, or a ``type`` other than
            ``media_type`` (or none).
        BadRequestError: (400) the ``boundary`` parameter is missing or unusable.
    """
    wanted = f'multipart/related; type="{media_type}"'
    if not value or not value.strip():
        raise UnsupportedMediaTypeError(f"Content-Type is missing; send {wanted}")
    msg = email.message.Message()
    msg["content-type"] = value
    found = msg.get_content_type()
    if found != "multipart/related":
        raise UnsupportedMediaTypeError(
            f"Content-Type {value.split(';', 1)[0].strip()[:100]!r} is not supported; send {wanted}"
        )
    kind = msg.get_param("type")
    kind_text = kind if isinstance(kind, str) else None
    if kind_text is None or kind_text.strip().lower() != media_type:
        shown = "none" if kind_text is None else repr(kind_text[:100])
        raise UnsupportedMediaTypeError(
            f"multipart/related type {shown} is not supported; send {wanted}"
        )
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BadRequestError("Content-Type has no boundary parameter")
    if len(boundary) > MAX_BOUNDARY or not boundary.isascii() or not boundary.isprintable():
        raise BadRequestError(
            f"the multipart boundary must be 1 to {MAX_BOUNDARY} printable ASCII characters"
        )
    return boundary


# -- the state machine ---------------------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` has lower-case names."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """The next bytes of the current part's body."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part's body is complete."""


PartEvent = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)
_NEED_MORE = -1
_INVALID = -2


class MultipartParser:
    """Incremental parser: :meth:`feed` bytes as they come, :meth:`finish` at the end.

    Memory stays bounded by the chunk fed plus the delimiter length (and one header block),
    whatever the size of a part. Events hold copies, so the caller may keep them.

    Args:
        boundary: the boundary parameter of the Content-Type (without the leading ``--``).
        limits: ``max_parts`` and ``max_header_bytes`` are enforced here.

    Raises (from :meth:`feed` / :meth:`finish`):
        BadRequestError: malformed part headers, or the body ends before the closing
            delimiter.
        PayloadTooLargeError: more than ``limits.max_parts`` parts.
    """

    def __init__(self, boundary: str | bytes, limits: MultipartLimits | None = None):
        raw = boundary.encode("ascii") if isinstance(boundary, str) else bytes(boundary)
        if not raw:
            raise ValueError("boundary must not be empty")
        self.limits = limits or MultipartLimits()
        self._delimiter = _CRLF + b"--" + raw
        # The first delimiter may open the body without a CRLF before it: pretend one.
        self._buf = bytearray(_CRLF)
        self._state = _PREAMBLE
        self._scan_from = 0
        self.parts = 0

    @property
    def done(self) -> bool:
        """Whether the closing delimiter has been seen."""
        return self._state == _EPILOGUE

    def feed(self, data: bytes) -> list[PartEvent]:
        """Parse ``data``; returns the events it completes."""
        if self._state == _EPILOGUE:
            return []
        self._buf += data
        events: list[PartEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> None:
        """Check that the body was complete.

        Raises:
            BadRequestError: the closing delimiter never came.
        """
        if self._state != _EPILOGUE:
            where = "before its first boundary" if self.parts == 0 else "inside a part"
            raise BadRequestError(
                f"the multipart body ended {where}: no closing boundary (unterminated body)"
            )

    # Each step consumes what it can and says whether another step may make progress.
    def _step(self, events: list[PartEvent]) -> bool:
        if self._state in (_PREAMBLE, _BODY):
            return self._scan(events)
        if self._state == _AFTER_DELIMITER:
            return self._after_delimiter(events)
        if self._state == _HEADERS:
            return self._headers(events)
        self._buf.clear()  # epilogue: ignored
        return False

    def _scan(self, events: list[PartEvent]) -> bool:
        buf, delim = self._buf, self._delimiter
        in_body = self._state == _BODY
        start = self._scan_from
        while True:
            i = buf.find(delim, start)
            if i < 0:
                # Keep what could still be the start of a delimiter; the rest is settled.
                keep_from = max(len(buf) - (len(delim) - 1), 0)
                if in_body and keep_from > 0:
                    events.append(PartData(_take(buf, keep_from)))
                del buf[:keep_from]
                self._scan_from = 0
                return False
            end = self._delimiter_end(i + len(delim))
            if end == _INVALID:  # CRLF--boundary followed by other bytes: data
                start = i + 1
                continue
            if in_body and i > 0:
                events.append(PartData(_take(buf, i)))
            if end == _NEED_MORE:
                del buf[:i]
                self._scan_from = 0
                return False
            if in_body:
                events.append(PartEnd())
            del buf[: i + len(delim)]
            self._scan_from = 0
            self._state = _AFTER_DELIMITER
            return True

    def _delimiter_end(self, j: int) -> int:
        """Where a delimiter line ending at ``j`` is followed by what a delimiter allows."""
        buf = self._buf
        n = len(buf)
        if n - j < 2:
            return _NEED_MORE
        if buf[j : j + 2] == b"--":
            return j + 2
        k = j
        while k < n and buf[k] in (0x20, 0x09):
            k += 1
            if k - j > MAX_PADDING:
                return _INVALID
        if n - k < 2:
            return _NEED_MORE
        return k + 2 if buf[k : k + 2] == _CRLF else _INVALID

    def _after_delimiter(self, events: list[PartEvent]) -> bool:
        buf = self._buf
        if buf[:2] == b"--":
            self._state = _EPILOGUE
            buf.clear()
            return False
        # Transport padding, then the CRLF that ends the delimiter line (checked in _scan).
        eol = buf.find(_CRLF)
        if eol < 0:
            return False
        del buf[: eol + 2]
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise PayloadTooLargeError(
                f"the multipart body has more than {self.limits.max_parts} parts"
            )
        self._state = _HEADERS
        return True

    def _headers(self, events: list[PartEvent]) -> bool:
        buf = self._buf
        if buf[:2] == _CRLF:  # no headers at all
            block = b""
            del buf[:2]
        else:
            end = buf.find(b"\r\n\r\n")
            limit = self.limits.max_header_bytes
            if end > limit or (end < 0 and len(buf) > limit + 3):
                raise BadRequestError(f"part {self.parts} has more than {limit} bytes of headers")
            if end < 0:
                return False
            block = bytes(buf[:end])
            del buf[: end + 4]
        events.append(PartStart(_parse_headers(block, self.parts)))
        self._state = _BODY
        self._scan_from = 0
        return True


def _take(buf: bytearray, n: int) -> bytes:
    """A copy of ``buf[:n]`` made in one pass (slicing a bytearray would copy twice)."""
    with memoryview(buf) as view:
        return bytes(view[:n])


def _parse_headers(block: bytes, number: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for line in block.split(_CRLF) if block else []:
        text = line.decode("latin-1")
        # Only spaces and tabs are blanks around a value (RFC 7230 OWS); str.strip() would
        # also eat bytes such as 0x1F or 0xA0 that belong to it.
        if text[:1] in (" ", "\t") and last is not None:  # obsolete line folding
            headers[last] += " " + text.strip(_OWS)
            continue
        name, sep, value = text.partition(":")
        name = name.strip(_OWS).lower()
        if not sep or not name or any(c in name for c in _OWS):
            raise BadRequestError(f"part {number} has a malformed header line")
        headers[name] = value.strip(_OWS)
        last = name
    return headers


def media_type_of(headers: dict[str, str]) -> str | None:
    """The lower-case media type of a part's Content-Type, without parameters."""
    value = headers.get("content-type")
    if value is None or not value.strip():
        return None
    return value.split(";", 1)[0].strip().lower()


# -- spooling ------------------------------------------------------------------------------


@dataclass
class SpooledPart:
    """One part of the body, written to a temporary file.

    Args:
        index: position in the body, from 0.
        headers: the part's headers, lower-case names.
        path: the temporary file; ``None`` when writing it failed.
        size: bytes of the part's body.
        sha256: hex digest of the part's body ('' when writing failed).
        error: why the file could not be written (``OSError`` with ``errno.ENOSPC`` on a
            full disk); the part's bytes were then dropped.
        head: up to :data:`HEAD_BYTES` first bytes, kept only when writing failed.
    """

    index: int
    headers: dict[str, str]
    path: Path | None
    size: int = 0
    sha256: str = ""
    error: OSError | None = None
    head: bytes = b""

    @property
    def media_type(self) -> str | None:
        """The part's media type (``None`` when it declared none)."""
        return media_type_of(self.headers)

    @property
    def is_dicom(self) -> bool:
        """Whether the part claims to be DICOM: ``application/dicom`` or no Content-Type."""
        return self.media_type in (None, DICOM_MEDIA_TYPE)


def _write(fh: IO[bytes], data: bytes) -> None:
    """Write ``data`` (one seam for tests that simulate a full disk)."""
    fh.write(data)


@dataclass
class _PartWriter:
    """Buffers a part's bytes and writes them to its temporary file from a worker thread."""

    part: SpooledPart
    buffer_bytes: int
    _fh: IO[bytes] | None = None
    _pending: list[bytes] = field(default_factory=list)
    _pending_size: int = 0
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    _head: bytearray = field(default_factory=bytearray)

    @classmethod
    def open(
        cls, index: int, headers: dict[str, str], spool: Path, buffer_bytes: int
    ) -> _PartWriter:
        part = SpooledPart(index=index, headers=headers, path=None)
        writer = cls(part, buffer_bytes)
        try:
            fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=spool)
        except OSError as exc:
            part.error = exc
            return writer
        part.path = Path(name)
        writer._fh = os.fdopen(fd, "wb")
        return writer

    def add(self, data: bytes) -> bool:
        """Take ``data``; ``True`` when the buffer is full and :meth:`flush` should run."""
        self.part.size += len(data)
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        if self.part.error is not None:
            return False
        self._pending.append(data)
        self._pending_size += len(data)
        return self._pending_size >= self.buffer_bytes

    def flush(self) -> None:
        """Write the buffered bytes (blocking: run it in a worker thread)."""
        pending, self._pending, self._pending_size = self._pending, [], 0
        if self.part.error is not None or self._fh is None:
            return
        try:
            for data in pending:
                self._hash.update(data)
                _write(self._fh, data)
        except OSError as exc:
            self._fail(exc)

    def close(self) -> SpooledPart:
        """Write the rest and close the file (blocking)."""
        self.flush()
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as exc:
                self._fail(exc)
            self._fh = None
        part = self.part
        if part.error is None:
            part.sha256 = self._hash.hexdigest()
        else:
            part.head = bytes(self._head)
        self._head = bytearray()
        return part

    def discard(self) -> None:
        """Close and remove the file (blocking)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        _unlink(self.part.path)

    def _fail(self, exc: OSError) -> None:
        self.part.error = exc
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        _unlink(self.part.path)
        self.part.path = None


async def spool_multipart(
    chunks: AsyncIterable[bytes],
    boundary: str,
    spool: Path,
    limits: MultipartLimits | None = None,
) -> list[SpooledPart]:
    """Read a whole multipart body from ``chunks``, each part into a file under ``spool``.

    ``spool`` should be on the same filesystem as where the files end up, so that storing
    one is a rename. On any error (malformed body, limit, client gone) every temporary file
    made so far is removed before the error propagates; on success the caller owns the
    files (see :func:`remove_spooled`).

    Raises:
        BadRequestError: malformed or unterminated body.
        PayloadTooLargeError: more than ``limits.max_bytes`` bytes or ``limits.max_parts``
            parts.
    """
    limits = limits or MultipartLimits()
    spool.mkdir(parents=True, exist_ok=True)
    parser = MultipartParser(boundary, limits)
    parts: list[SpooledPart] = []
    writer: _PartWriter | None = None
    total = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            total += len(chunk)
            if total > limits.max_bytes:
                raise PayloadTooLargeError(
                    f"the multipart body is larger than {limits.max_bytes} bytes"
                )
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    writer = _PartWriter.open(len(parts), event.headers, spool, limits.buffer_bytes)
                elif isinstance(event, PartData):
                    assert writer is not None
                    if writer.add(event.data):
                        await anyio.to_thread.run_sync(writer.flush)
                else:
                    assert writer is not None
                    parts.append(await anyio.to_thread.run_sync(writer.close))
                    writer = None
        parser.finish()
    except BaseException:
        with anyio.CancelScope(shield=True):
            if writer is not None:
                await anyio.to_thread.run_sync(writer.discard)
            await anyio.to_thread.run_sync(remove_spooled, parts)
        raise
    return parts


def remove_spooled(parts: list[SpooledPart]) -> None:
    """Remove the temporary files of ``parts`` that are still there."""
    for part in parts:
        _unlink(part.path)


def _unlink(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
