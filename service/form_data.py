"""A small, well-formed ``multipart/form-data`` body split in one pass over its bytes.

``POST /v1/predict`` carries one image (tens to hundreds of kB) and a few text fields.
Starlette's form parser (python-multipart, a callback per parser event, a spooled file per
part) took about 48 us of the event loop for a 30 kB form here, and several times that with
the caches the forward pass had just swept; splitting the bytes at the boundary takes about
6 us. :func:`split_form` does that for the common case only: a body that is exactly
well-formed (RFC 7578: ``--boundary CRLF``, parts with a ``Content-Disposition: form-data``
header that names them, ``CRLF --boundary --`` at the end), within the part limits, with no
charset of its own. For anything else it returns ``None`` and the route parses the same
(cached) body with Starlette's parser, so unusual and malformed bodies are answered exactly
as before (400 with Starlette's message, a part without its closing boundary dropped, ...).
Decoding matches Starlette's: names, file names and field values in UTF-8, Latin-1 where
that fails; a repeated name keeps its last value.

Example::

    form = split_form(body, request.headers["content-type"], max_files=8, max_fields=32)
    if form is not None:
        image = form.files.get("file")  # FormFile(filename, content_type, data)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from python_multipart.multipart import parse_options_header

#: Bodies up to this size may take the fast path: Starlette's parser keeps parts this small
#: in memory too (its spool size), so reading the whole body first costs no more memory.
SMALL_FORM_BYTES = 1024 * 1024

# Header lines python-multipart reads: RFC 7230 token names, at most 8 lines (of at most
# 4 kB) a part; control bytes (a CR or LF on its own, NUL) are left to it.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_MAX_HEADERS = 8
_MAX_HEADER_LINE = 4096


@dataclass(frozen=True)
class FormFile:
    """A file part: what ``starlette.datastructures.UploadFile`` would have told."""

    filename: str
    content_type: str | None
    data: bytes


@dataclass
class Form:
    """The parts of a form by name, the last value of a repeated name kept."""

    files: dict[str, FormFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _headers(block: bytes) -> dict[bytes, bytes] | None:
    """A part's header lines -> ``{lowercased name: value}`` as python-multipart reads them
    (a token name, the value after its leading spaces); ``None`` for anything it might read
    otherwise or refuse (control bytes, more or longer lines than it allows, a repeat)."""
    lines = block.split(b"\r\n")
    if len(lines) > _MAX_HEADERS:
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if (
            not colon
            or len(line) > _MAX_HEADER_LINE
            or _CONTROL.search(line)
            or not _TOKEN.fullmatch(name)
            or name.lower() in headers
        ):
            return None
        headers[name.lower()] = value.lstrip(b" ")
    return headers


def split_form(body: bytes, content_type: str, *, max_files: int, max_fields: int) -> Form | None:
    """The parts of a well-formed form body, or ``None`` for Starlette's parser to answer."""
    if len(body) > SMALL_FORM_BYTES:
        return None
    media_type, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary or b"charset" in params:
        return None  # Starlette reads another media type as an empty form
    opening = b"--" + boundary + b"\r\n"
    closing = b"\r\n--" + boundary + b"--"
    if not body.startswith(opening):
        return None
    end = body.rfind(closing)
    if end < 0 or body[end + len(closing) :] not in (b"", b"\r\n"):
        return None
    form = Form()
    files = fields = 0
    for part in body[len(opening) : end].split(b"\r\n--" + boundary + b"\r\n"):
        head, blank, data = part.partition(b"\r\n\r\n")
        headers = _headers(head) if blank else None
        if headers is None:
            return None
        disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None or b"charset" in options:
            return None
        if b"--" + boundary in data:  # a delimiter Starlette would read otherwise
            return None
        key = _decode(name)
        if key in (form.fields if b"filename" in options else form.files):
            return None  # a name both a file and a field: Starlette's order decides
        if b"filename" in options:
            files += 1
            if files > max_files:
                return None
            content = headers.get(b"content-type")
            form.files[key] = FormFile(
                _decode(options[b"filename"]),
                None if content is None else content.decode("latin-1"),
                data,
            )
        else:
            fields += 1
            if fields > max_fields or key == "_charset_":
                return None
            form.fields[key] = _decode(data)
    return form
