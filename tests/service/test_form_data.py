"""split_form: the predict form's fast path, held to Starlette's parser.

Whatever the body (forms as httpx and curl send them, arbitrary parts with CRLFs and
boundary-like bytes in them, and the same bodies cut, flipped or padded), ``split_form``
either gives exactly what Starlette's form parser gives (the last file and field of each
name, with file name, content type and bytes), or ``None``: it never answers differently.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.form_data import SMALL_FORM_BYTES, Form, FormFile, split_form

BOUNDARY = "kgdx-test-boundary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
LIMITS = {"max_files": 3, "max_fields": 4}


def starlette_form(body: bytes, content_type: str, **limits: int) -> Form | None:
    """What Starlette's parser reads from ``body``, as a Form; ``None`` where it refuses."""

    async def parse() -> Form | None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/",
            "query_string": b"",
            "headers": [(b"content-type", content_type.encode("latin-1"))],
        }
        try:
            form = await Request(scope, receive).form(**limits)
        except Exception:  # Starlette's 400 (HTTPException) or the parser's own error
            return None
        out = Form()
        for key, value in form.items():  # the last value of each name
            if isinstance(value, UploadFile):
                data = await value.read()
                out.files[key] = FormFile(value.filename or "", value.content_type, data)
            else:
                out.fields[key] = value
        await form.close()
        return out

    return asyncio.run(parse())


def encode(parts: list[tuple[str, str | None, str | None, bytes]]) -> bytes:
    """``(name, filename, content type, data)`` parts as a form body under BOUNDARY."""
    out = []
    for name, filename, ctype, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"Content-Disposition: {disposition}\r\n"
        if ctype is not None:
            head += f"Content-Type: {ctype}\r\n"
        out.append(f"--{BOUNDARY}\r\n{head}\r\n".encode() + data + b"\r\n")
    return b"".join(out) + f"--{BOUNDARY}--\r\n".encode()


def test_an_httpx_form_splits_as_starlette_reads_it() -> None:
    request = httpx.Request(
        "POST",
        "http://x/",
        files={"file": ("chest x-ray.png", b"\x89PNG\r\n\x1a\n\r\n--x\x00", "image/png")},
        data={"text": "fièvre, toux", "threshold": "0.3", "heatmap": ""},
    )
    body, ctype = request.read(), request.headers["content-type"]
    form = split_form(body, ctype, **LIMITS)
    assert form is not None and form == starlette_form(body, ctype, **LIMITS)
    png = b"\x89PNG\r\n\x1a\n\r\n--x\x00"
    assert form.files["file"] == FormFile("chest x-ray.png", "image/png", png)
    assert form.fields == {"text": "fièvre, toux", "threshold": "0.3", "heatmap": ""}


def test_a_repeated_name_keeps_its_last_value_and_no_content_type_is_none() -> None:
    body = encode([("file", "a.png", None, b"A"), ("file", "b.png", None, b"B")])
    form = split_form(body, CTYPE, **LIMITS)
    assert form is not None and form.files == {"file": FormFile("b.png", None, b"B")}
    assert form == starlette_form(body, CTYPE, **LIMITS)


NO_DISPOSITION = f"--{BOUNDARY}\r\nX-Other: 1\r\n\r\nx\r\n--{BOUNDARY}--".encode()


@pytest.mark.parametrize(
    ("body", "ctype", "why"),
    [
        (encode([("f", None, None, b"x")] * 5), CTYPE, "more fields than allowed"),
        (encode([("f", "a", None, b"x")] * 4), CTYPE, "more files than allowed"),
        (encode([("file", "a", None, b"x"), ("file", None, None, b"t")]), CTYPE, "file and field"),
        (encode([("f", None, None, b"x")]), "multipart/form-data", "no boundary"),
        (encode([("f", None, None, b"x")]), CTYPE + "; charset=latin-1", "a charset"),
        (encode([("f", None, None, b"x")]), CTYPE.replace(";", "\xa0;", 1), "media type"),
        (encode([("f", None, None, b"x")]), f"multipart/mixed; boundary={BOUNDARY}", "mixed"),
        (encode([("_charset_", None, None, b"latin-1")]), CTYPE, "a _charset_ field"),
        (b"preamble\r\n" + encode([("f", None, None, b"x")]), CTYPE, "a preamble"),
        (encode([("f", None, None, b"x")])[:-4], CTYPE, "no closing delimiter"),
        (encode([("f", None, None, b"x\r\n--" + BOUNDARY.encode() + b"X")]), CTYPE, "delimiter"),
        (encode([("f", None, None, b"x")]) + b"epilogue", CTYPE, "an epilogue"),
        (NO_DISPOSITION, CTYPE, "no Content-Disposition"),
        (encode([("f", None, None, b"x" * SMALL_FORM_BYTES)]), CTYPE, "too large"),
    ],
)
def test_anything_unusual_is_left_to_starlette(body: bytes, ctype: str, why: str) -> None:
    assert split_form(body, ctype, **LIMITS) is None, why


_names = st.sampled_from(["file", "text", "threshold", "a", "é"])
_bytes = st.lists(
    st.sampled_from([b"x", b"\r\n", b"--", BOUNDARY.encode(), b"\r\n\r\n", b"\x00", b"\xff"]),
    max_size=8,
).map(b"".join)
_part = st.tuples(
    _names,
    st.none() | st.sampled_from(["a.png", "", "b c.dcm", "ü.png"]),
    st.none() | st.sampled_from(["image/png", "application/dicom"]),
    _bytes,
)


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    parts=st.lists(_part, max_size=6),
    cut=st.none() | st.integers(0, 400),
    flip=st.none() | st.tuples(st.integers(0, 400), st.integers(0, 255)),
    insert=st.none() | st.tuples(st.integers(0, 400), _bytes),
    tail=st.sampled_from([b"", b"\r\n", b"x", b"\r\n\r\n"]),
    ctype=st.sampled_from(
        [
            CTYPE,
            f'Multipart/Form-Data; boundary="{BOUNDARY}"',
            f"multipart/form-data\xa0; boundary={BOUNDARY}",
            f"multipart/form-data; boundary={BOUNDARY}; charset=utf-8",
            f"multipart/form-data; boundary={BOUNDARY}x",
        ]
    ),
)
@example(parts=[("file", "a.png", "image/png", b"\r\n--" + BOUNDARY.encode())], cut=None,
         flip=None, insert=None, tail=b"", ctype=CTYPE)  # fmt: skip
@example(  # a NUL in a header: python-multipart refuses it
    parts=[("file", "a.png", "image/png", b"")], cut=None, flip=(84, 0), insert=None, tail=b"",
    ctype=CTYPE,
)  # fmt: skip
def test_split_form_never_answers_differently_from_starlette(
    parts: list[tuple[str, str | None, str | None, bytes]],
    cut: int | None,
    flip: tuple[int, int] | None,
    insert: tuple[int, bytes] | None,
    tail: bytes,
    ctype: str,
) -> None:
    body = bytearray(encode(parts) + tail)
    if insert is not None:
        body[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        del body[cut:]
    if flip is not None and flip[0] < len(body):
        body[flip[0]] = flip[1]
    quick = split_form(bytes(body), ctype, **LIMITS)
    if quick is not None:
        assert quick == starlette_form(bytes(body), ctype, **LIMITS)
