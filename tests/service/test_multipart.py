"""The streaming multipart/related parser, checked against the standard library's MIME parser."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import errno
import hashlib
import itertools
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import IO

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import service.multipart as mp
from service.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from service.multipart import (
    MultipartLimits,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_related_content_type,
    spool_multipart,
)

BOUNDARY = "kgdx-b0undary"


def body_of(
    parts: Iterable[tuple[dict[str, str], bytes]],
    boundary: str = BOUNDARY,
    *,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    lead_crlf: bool = False,
    close: bool = True,
) -> bytes:
    """A multipart body the way RFC 2046 writes it."""
    out = [preamble]
    first = True
    for headers, payload in parts:
        lead = b"\r\n" if (lead_crlf or not first or preamble) else b""
        out.append(lead + b"--" + boundary.encode() + b"\r\n")
        out += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
        out += [b"\r\n", payload]
        first = False
    if close:
        lead = b"\r\n" if (not first or preamble or lead_crlf) else b""
        out.append(lead + b"--" + boundary.encode() + b"--")
        out.append(epilogue)
    return b"".join(out)


def parse(
    body: bytes, boundary: str = BOUNDARY, splits: Iterable[int] = (), **limits: int
) -> list[tuple[dict[str, str], bytes]]:
    """Feed ``body`` cut at ``splits``; returns (headers, payload) per part."""
    parser = MultipartParser(boundary, MultipartLimits(**limits))
    events = []
    cuts = sorted({0, *(s for s in splits if 0 < s < len(body)), len(body)})
    for a, b in itertools.pairwise(cuts):
        events += parser.feed(body[a:b])
    parser.finish()
    parts: list[tuple[dict[str, str], bytes]] = []
    open_part = False
    for event in events:
        if isinstance(event, PartStart):
            assert not open_part
            parts.append((event.headers, b""))
            open_part = True
        elif isinstance(event, PartData):
            assert open_part and event.data
            parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
        else:
            assert isinstance(event, PartEnd) and open_part
            open_part = False
    assert not open_part
    return parts


def reference(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The standard library's reading of the same body."""
    head = f'Content-Type: multipart/related; type="application/dicom"; boundary="{boundary}"'
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        head.encode() + b"\r\n\r\n" + body
    )
    out = []
    for part in msg.get_payload():
        assert isinstance(part, email.message.Message)
        headers = {k.lower(): str(v) for k, v in part.items()}
        payload = part.get_payload(decode=True)
        out.append((headers, payload if isinstance(payload, bytes) else b""))
    return out


# -- Content-Type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        f'multipart/related; type=application/dicom; boundary="{BOUNDARY}"',
        f'Multipart/Related;TYPE="Application/DICOM";Boundary="{BOUNDARY}"',
        f'multipart/related; boundary="{BOUNDARY}"; type="application/dicom"; start="<a>"',
    ],
)
def test_content_type_gives_the_boundary(value: str) -> None:
    assert parse_related_content_type(value) == BOUNDARY


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "application/dicom",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        f'multipart/related; type="image/jpeg"; boundary={BOUNDARY}',
        f"multipart/related; boundary={BOUNDARY}",
        "not a media type",
    ],
)
def test_other_media_types_are_415(value: str | None) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        parse_related_content_type(value)


@pytest.mark.parametrize(
    "value",
    [
        'multipart/related; type="application/dicom"',
        'multipart/related; type="application/dicom"; boundary=""',
        'multipart/related; type="application/dicom"; boundary="' + "x" * 201 + '"',
    ],
)
def test_missing_or_unusable_boundary_is_400(value: str) -> None:
    with pytest.raises(BadRequestError, match="boundary"):
        parse_related_content_type(value)


# -- framing --------------------------------------------------------------------------------


DICOM = {"Content-Type": "application/dicom"}


def test_parts_headers_and_payloads() -> None:
    parts = [(DICOM, b"first"), ({}, b""), ({"Content-Type": "text/plain", "X-A": "1"}, b"3")]
    assert parse(body_of(parts)) == [
        ({"content-type": "application/dicom"}, b"first"),
        ({}, b""),
        ({"content-type": "text/plain", "x-a": "1"}, b"3"),
    ]


def test_preamble_epilogue_and_leading_crlf_are_ignored() -> None:
    parts = [(DICOM, b"a"), (DICOM, b"b")]
    expected = parse(body_of(parts))
    assert parse(body_of(parts, preamble=b"This is a preamble.\r\n--xx")) == expected
    assert parse(body_of(parts, epilogue=b"\r\nepilogue --" + BOUNDARY.encode())) == expected
    assert parse(body_of(parts, lead_crlf=True)) == expected


def test_transport_padding_after_a_delimiter() -> None:
    body = b"--" + BOUNDARY.encode() + b" \t \r\n\r\nA\r\n--" + BOUNDARY.encode() + b"--  \r\n"
    assert parse(body) == [({}, b"A")]


def test_boundary_like_bytes_inside_a_payload_are_data() -> None:
    tricky = (
        b"\r\n--" + BOUNDARY.encode() + b"X and \r\n--" + BOUNDARY[:-1].encode() + b"\r\n-\r\n--"
    )
    body = body_of([(DICOM, tricky), (DICOM, b"next")])
    for step in (1, 2, 3, 5, 16, len(body)):
        assert parse(body, splits=range(0, len(body), step))[0][1] == tricky


def test_folded_header_is_joined() -> None:
    body = (
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom;\r\n  transfer-syntax=1"
        b"\r\n\r\nX\r\n--" + BOUNDARY.encode() + b"--"
    )
    assert parse(body) == [({"content-type": "application/dicom; transfer-syntax=1"}, b"X")]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "no closing boundary"),
        (b"just some bytes without any delimiter", "no closing boundary"),
        (b"--" + BOUNDARY.encode() + b"\r\n\r\npayload without end", "no closing boundary"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: applic", "no closing boundary"),
        (b"--" + BOUNDARY.encode() + b"\r\nno colon here\r\n\r\nX", "malformed header"),
    ],
)
def test_malformed_bodies_are_400(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        parse(body)


def test_zero_parts_is_a_valid_body() -> None:
    assert parse(b"--" + BOUNDARY.encode() + b"--\r\n") == []


def test_limits() -> None:
    with pytest.raises(PayloadTooLargeError, match="more than 2 parts"):
        parse(body_of([(DICOM, b"1"), (DICOM, b"2"), (DICOM, b"3")]), max_parts=2)
    huge = {"X-Big": "y" * 5000}
    with pytest.raises(BadRequestError, match="bytes of headers"):
        parse(body_of([(huge, b"1")]), max_header_bytes=1024)
    # Header limit also holds when the header block never ends.
    endless = b"--" + BOUNDARY.encode() + b"\r\nX-A: " + b"a" * 5000
    with pytest.raises(BadRequestError, match="bytes of headers"):
        parse(endless, splits=range(0, len(endless), 100), max_header_bytes=1024)


def test_memory_stays_bounded_by_the_chunk() -> None:
    parser = MultipartParser(BOUNDARY)
    parser.feed(b"--" + BOUNDARY.encode() + b"\r\n\r\n")
    chunk = b"\x00" * 65536
    for _ in range(200):
        events = parser.feed(chunk)
        assert sum(len(e.data) for e in events if isinstance(e, PartData)) <= len(chunk) + 32
        assert len(parser._buf) < len(BOUNDARY) + 8  # only a possible delimiter start is kept


# -- property: random parts, random payloads, random cuts == the email package ----------------

_BOUNDARIES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?",
    min_size=1,
    max_size=70,
).filter(lambda b: not b.endswith(" "))


@st.composite
def _payload(draw: st.DrawFn, boundary: str) -> bytes:
    raw = boundary.encode()
    near = [
        b"\r\n",
        b"\r",
        b"\n",
        b"--",
        b"\r\n-",
        b"\r\n--",
        b"\r\n\r\n",
        b"\r\n--" + raw[: max(len(raw) - 1, 0)],
        b"--" + raw[:-1],
        raw,
    ]
    pieces = draw(st.lists(st.binary(max_size=40) | st.sampled_from(near), max_size=8))
    data = b"".join(pieces)
    assume(b"--" + raw not in data)
    return data


_HEADERS = st.sampled_from(
    [
        {},
        {"Content-Type": "application/dicom"},
        {"Content-Type": "application/dicom", "Content-Location": "x.dcm"},
        {"Content-Type": "application/octet-stream", "Content-Length": "12"},
    ]
)


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[str, list[tuple[dict[str, str], bytes]], bytes, list[int]]:
    boundary = draw(_BOUNDARIES)
    parts = draw(st.lists(st.tuples(_HEADERS, _payload(boundary)), min_size=1, max_size=5))
    preamble = draw(st.sampled_from([b"", b"preamble\r\n", b"x"]))
    epilogue = draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue\r\n"]))
    body = body_of(parts, boundary, preamble=preamble, epilogue=epilogue)
    splits = draw(st.lists(st.integers(0, len(body)), max_size=12))
    return boundary, parts, body, splits


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(_bodies())
def test_matches_the_email_package_for_any_cut(
    case: tuple[str, list[tuple[dict[str, str], bytes]], bytes, list[int]],
) -> None:
    boundary, parts, body, splits = case
    got = parse(body, boundary, splits)
    assert got == reference(body, boundary)
    assert [p for _, p in got] == [p for _, p in parts]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(_bodies(), st.integers(1, 64))
def test_a_truncated_body_is_always_rejected(
    case: tuple[str, list[tuple[dict[str, str], bytes]], bytes, list[int]], cut: int
) -> None:
    boundary, _, body, splits = case
    closing = body.rindex(b"--" + boundary.encode() + b"--")
    truncated = body[: max(0, closing - cut)] if cut % 2 else body[: closing + len(boundary) + 3]
    with pytest.raises(BadRequestError, match="no closing boundary"):
        parse(truncated, boundary, splits)


# -- spooling to files ------------------------------------------------------------------------


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _spool(body: bytes, spool: Path, size: int = 7, **limits: int) -> list[mp.SpooledPart]:
    return anyio.run(
        spool_multipart, _chunks(body, size), BOUNDARY, spool, MultipartLimits(**limits)
    )


def test_spooled_parts_are_files_with_their_hash(tmp_path: Path) -> None:
    payloads = [b"x" * 3000, b"", bytes(range(256)) * 20]
    body = body_of([(DICOM, p) for p in payloads])
    parts = _spool(body, tmp_path, size=333, buffer_bytes=1024)
    assert [p.path.read_bytes() for p in parts if p.path] == payloads
    assert [p.sha256 for p in parts] == [hashlib.sha256(p).hexdigest() for p in payloads]
    assert [p.size for p in parts] == [len(p) for p in payloads]
    assert all(p.is_dicom and p.error is None and p.head == b"" for p in parts)
    mp.remove_spooled(parts)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [10, 200, 3500])
def test_unterminated_body_leaves_no_files(tmp_path: Path, cut: int) -> None:
    body = body_of([(DICOM, b"a" * 1000), (DICOM, b"b" * 3000)])
    with pytest.raises(BadRequestError, match="no closing boundary"):
        _spool(body[:cut], tmp_path, size=100, buffer_bytes=512)
    assert list(tmp_path.iterdir()) == []


def test_over_the_byte_limit_is_413_and_leaves_no_files(tmp_path: Path) -> None:
    body = body_of([(DICOM, b"a" * 5000)] * 3)
    with pytest.raises(PayloadTooLargeError):
        _spool(body, tmp_path, size=1000, max_bytes=8000)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_fails_the_part_not_the_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = mp._write

    def write(fh: IO[bytes], data: bytes) -> None:
        if data.startswith(b"SECOND") or getattr(fh, "_full", False):
            fh._full = True  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(mp, "_write", write)
    body = body_of([(DICOM, b"FIRST" * 100), (DICOM, b"SECOND" * 20000), (DICOM, b"THIRD")])
    parts = _spool(body, tmp_path, size=4096, buffer_bytes=2048)
    first, second, third = parts
    assert first.error is None and first.path is not None
    assert first.path.read_bytes() == b"FIRST" * 100
    assert second.path is None and second.error is not None
    assert second.error.errno == errno.ENOSPC
    assert second.size == 120000 and second.head.startswith(b"SECOND")
    assert len(second.head) == mp.HEAD_BYTES
    assert third.path is not None and third.path.read_bytes() == b"THIRD"
    mp.remove_spooled(parts)
    assert list(tmp_path.iterdir()) == []
