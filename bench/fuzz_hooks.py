"""Schemathesis hooks of ``bench/fuzz_api.py``, loaded by the ``st run`` process it starts.

``bench/fuzz_api.py`` names this file as the ``hooks`` of its generated schemathesis
configuration; nothing else imports it. It adds, to what schemathesis does by itself:

- the check ``backpressure_retry_after``: the run lets ``503`` through ``not_a_server_error``
  (a full inference queue is backpressure, not a server error), so a 503 must say when to
  come back, with ``Retry-After``;
- a serializer for ``multipart/related`` (the STOW-RS body, declared as an array of DICOM
  parts): each generated part is framed as an ``application/dicom`` part, under a
  ``multipart/related; type="application/dicom"; boundary=...`` Content-Type;
- real data mixed into what is generated, read from the JSON file named by
  ``$KGDX_FUZZ_SEEDS`` (written by ``bench/fuzz_api.py`` after it made them on the server):
  result ids, StudyInstanceUIDs, concept ids and finding names where an operation takes
  them (else nearly every case stops at a 404), real PNG / DICOM files, whole or mutated
  (truncated, bytes overwritten), as the ``file`` of ``POST /v1/predict`` and as parts of
  STOW-RS bodies (else every case stops at a 415 before the decoders run). About half of
  the cases of such an operation get real data; the other half stay as generated.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.transport import SerializationContext, register_serializer

SEEDS_ENV = "KGDX_FUZZ_SEEDS"
#: Path and query parameters -> the seeds key that holds real values for them.
PARAMETER_SEEDS = {
    "result_id": "result_ids",
    "study_uid": "study_uids",
    "concept_id": "concept_ids",
    "from": "concept_ids",
    "to": "concept_ids",
    "finding": "finding_names",
    "StudyInstanceUID": "study_uids",
}
_PATH_PARAMETER = re.compile(r"{([^}]+)}")


@cache
def seeds() -> dict[str, Any]:
    """The seeds file's content; empty when ``$KGDX_FUZZ_SEEDS`` is unset."""
    path = os.environ.get(SEEDS_ENV)
    if not path:
        return {}
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


@cache
def seed_files(key: str) -> tuple[bytes, ...]:
    """The bytes of the files listed under ``key`` in the seeds."""
    return tuple(Path(p).read_bytes() for p in seeds().get(key, ()))


# -- checks ---------------------------------------------------------------------------------


@schemathesis.check
def backpressure_retry_after(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """A 503 (backpressure, or not ready) tells the client when to retry."""
    if response.status_code == 503 and not response.headers.get("retry-after"):
        raise AssertionError("503 without a Retry-After header")
    return None


# -- STOW-RS bodies -------------------------------------------------------------------------


def _part_bytes(value: Any) -> bytes:
    data = getattr(value, "data", value)  # schemathesis wraps generated binary in Binary
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    return json.dumps(data).encode("utf-8")


def stow_serializer(_: SerializationContext, value: Any) -> dict[str, Any]:
    """A generated body (normally a list of parts) as a ``multipart/related`` DICOM body."""
    parts = value if isinstance(value, list) else [value]
    boundary = f"kgdx-fuzz-{uuid.uuid4().hex}"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + _part_bytes(p) + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return {"data": body, "headers": {"Content-Type": content_type}}


register_serializer(stow_serializer, "multipart/related")


# -- real data in the generated cases -------------------------------------------------------


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` whole, truncated, or with a few bytes overwritten."""

    def truncate(at: int) -> bytes:
        return data[:at]

    def overwrite(edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(data)
        for at, byte in edits:
            out[at] = byte
        return bytes(out)

    last = max(len(data) - 1, 0)
    return st.one_of(
        st.just(data),
        st.integers(0, last).map(truncate),
        st.lists(st.tuples(st.integers(0, last), st.integers(0, 255)), min_size=1, max_size=8).map(
            overwrite
        ),
    )


def real_files(*keys: str) -> st.SearchStrategy[bytes] | None:
    files = [data for key in keys for data in seed_files(key)]
    if not files:
        return None
    return st.sampled_from(files).flatmap(mutated)


def _with_known(
    strategy: st.SearchStrategy[Any], names: list[str]
) -> st.SearchStrategy[Any] | None:
    """``strategy``'s dicts with the parameters in ``names`` set to real values."""
    known = {
        name: st.sampled_from(values)
        for name in names
        if (values := seeds().get(PARAMETER_SEEDS.get(name, ""), []))
    }
    if not known:
        return None
    fixed = st.fixed_dictionaries(known)

    def merge(generated: Any) -> st.SearchStrategy[Any]:
        if not isinstance(generated, dict):
            return st.just(generated)
        return fixed.map(lambda real: {**generated, **real})

    return strategy.flatmap(merge)


@schemathesis.hook
def before_generate_path_parameters(
    context: schemathesis.HookContext, strategy: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    operation = context.operation
    if operation is None:
        return strategy
    real = _with_known(strategy, _PATH_PARAMETER.findall(operation.path))
    return strategy if real is None else st.one_of(strategy, real)


@schemathesis.hook
def before_generate_query(
    context: schemathesis.HookContext, strategy: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    operation = context.operation
    if operation is None:
        return strategy
    real = _with_known(strategy, [p.name for p in operation.query if p.name in PARAMETER_SEEDS])
    return strategy if real is None else st.one_of(strategy, real)


@schemathesis.hook
def before_generate_body(
    context: schemathesis.HookContext, strategy: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    operation = context.operation
    if operation is None or operation.method.upper() != "POST":
        return strategy
    if operation.path == "/v1/predict":
        files = real_files("images", "dicom")
        if files is None:
            return strategy

        def with_file(generated: Any) -> st.SearchStrategy[Any]:
            if not isinstance(generated, dict):
                return st.just(generated)
            return files.map(lambda data: {**generated, "file": data})

        return st.one_of(strategy, strategy.flatmap(with_file))
    if operation.path.startswith("/dicomweb/studies"):
        parts = real_files("dicom")
        if parts is None:
            return strategy
        return st.one_of(strategy, st.lists(parts, min_size=1, max_size=3))
    return strategy
