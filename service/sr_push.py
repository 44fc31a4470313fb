"""Send a DICOM SR back to the PACS: a STOW-RS client (PS3.18 §10.5) over httpx.

:func:`push_sr` posts one instance to ``<root>/studies`` as ``multipart/related;
type="application/dicom"`` and reads the Store Instances Response:

- 200 / 202 whose ``00081199`` ReferencedSOPSequence names the SOP Instance: stored;
- the SOP Instance in ``00081198`` FailedSOPSequence with failure reason ``0x0111``
  (duplicate SOP Instance), or a 409 answer without another reason: already there, which
  is a success too (a re-push after a crash sends the same SOPInstanceUID);
- 408, 429, 5xx, a failure reason ``0xA7xx`` (out of resources), a timeout or a connection
  error: :class:`TransientPushError`, worth retrying later;
- any other 4xx, or a 2xx that does not name the instance: :class:`PermanentPushError`.

Authentication is HTTP basic (``user`` / ``password``) or a bearer ``token``. Error messages
carry status codes and failure reasons, never the SOP Instance UID or a response body.

Example::

    outcome = push_sr(sr_dataset, "http://pacs:8042/dicom-web", user="kgdx", password="...")
    outcome.already_stored
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydicom
from pydicom.dataset import Dataset

from service.failpoints import failpoint

__all__ = [
    "PermanentPushError",
    "PushError",
    "PushOutcome",
    "TransientPushError",
    "push_sr",
    "stow_body",
]

#: Failure reason: the SOP Instance is already stored (PS3.4 C.4.2.1.4 / PS3.18 Annex I).
DUPLICATE_SOP_INSTANCE = 0x0111
_RETRY_STATUSES = frozenset({408, 425, 429})


class PushError(Exception):
    """The SR did not land; ``status`` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TransientPushError(PushError):
    """Worth retrying: the destination was unreachable, overloaded or failed internally."""


class PermanentPushError(PushError):
    """Retrying will not help: the destination refused the request or the instance."""


@dataclass(frozen=True)
class PushOutcome:
    """A push that landed.

    Attributes:
        status: the HTTP status of the answer.
        sop_instance_uid: the instance pushed.
        already_stored: the destination had it already (a re-push).
        retrieve_url: ``00081190`` of the instance, when the answer gave one.
        elapsed_ms: the request's round trip.
    """

    status: int
    sop_instance_uid: str
    already_stored: bool
    retrieve_url: str | None
    elapsed_ms: float


def stow_body(data: bytes, boundary: str) -> bytes:
    """One DICOM instance as a ``multipart/related`` body with ``boundary``."""
    return b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"),
            data,
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        )
    )


def push_sr(
    sr: Dataset | bytes,
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
    client: httpx.Client | None = None,
) -> PushOutcome:
    """Store ``sr`` (a dataset, or DICOM Part 10 bytes) at the DICOMweb root ``url``.

    Args:
        sr: the SR instance.
        url: DICOMweb root (``http://pacs:8042/dicom-web``); the request goes to
            ``<url>/studies``.
        user, password: HTTP basic authentication.
        token: bearer token (instead of basic authentication).
        timeout_s: connect / read / write timeout.
        client: an ``httpx.Client`` to send with (tests pass one with a mock transport).

    Raises:
        ValueError: a bad ``url``, both basic and bearer authentication, or ``sr`` without a
            SOPInstanceUID.
        TransientPushError: retry later.
        PermanentPushError: do not retry.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be an http(s) DICOMweb root, got {url!r}")
    if token is not None and (user is not None or password is not None):
        raise ValueError("give either user/password or token, not both")
    data, sop = _part10(sr)
    boundary = f"kgdx-{secrets.token_hex(16)}"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    extra: dict[str, Any] = {}
    if user is not None:
        extra["auth"] = httpx.BasicAuth(user, password or "")
    endpoint = url.rstrip("/") + "/studies"
    body = stow_body(data, boundary)
    failpoint("sr_push.before_send")
    started = time.perf_counter()
    try:
        if client is None:
            with httpx.Client(timeout=timeout_s) as own:
                response = own.post(endpoint, content=body, headers=headers, **extra)
        else:
            response = client.post(
                endpoint, content=body, headers=headers, timeout=timeout_s, **extra
            )
    except httpx.TimeoutException as e:
        raise TransientPushError(f"STOW-RS request timed out ({type(e).__name__})") from None
    except httpx.TransportError as e:
        raise TransientPushError(f"STOW-RS request failed ({type(e).__name__})") from None
    elapsed = (time.perf_counter() - started) * 1e3
    outcome = _outcome(response, sop, elapsed)
    failpoint("sr_push.after_send")
    return outcome


def _part10(sr: Dataset | bytes) -> tuple[bytes, str]:
    ds: Dataset
    if isinstance(sr, bytes | bytearray | memoryview):
        data = bytes(sr)
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=[0x00080018])
    elif isinstance(sr, Dataset):
        ds = sr
        if not str(ds.get("SOPInstanceUID", "") or ""):
            raise ValueError("the SR has no SOPInstanceUID")
        buf = BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
    else:
        raise TypeError(f"sr must be a pydicom Dataset or bytes, got {type(sr).__name__}")
    sop = str(ds.get("SOPInstanceUID", "") or "")
    if not sop:
        raise ValueError("the SR has no SOPInstanceUID")
    return data, sop


def _outcome(response: httpx.Response, sop: str, elapsed_ms: float) -> PushOutcome:
    status = response.status_code
    body = _dicom_json(response)
    stored, retrieve = _referenced(body, sop)
    reasons = _failure_reasons(body, sop)

    def ok(already: bool) -> PushOutcome:
        return PushOutcome(status, sop, already, retrieve, elapsed_ms)

    if status in (200, 202) and stored:
        return ok(False)
    if DUPLICATE_SOP_INSTANCE in reasons:
        return ok(True)
    if status == 409 and not reasons:
        return ok(True)  # refused without saying why: the usual answer to a re-send
    if reasons:
        text = ", ".join(f"0x{r:04X}" for r in sorted(reasons))
        if all(0xA700 <= r <= 0xA7FF for r in reasons):
            raise TransientPushError(f"STOW-RS HTTP {status}: out of resources ({text})", status)
        raise PermanentPushError(f"STOW-RS HTTP {status}: instance refused ({text})", status)
    if status >= 500 or status in _RETRY_STATUSES:
        raise TransientPushError(f"STOW-RS HTTP {status}", status)
    if 200 <= status < 300:
        raise PermanentPushError(
            f"STOW-RS HTTP {status}: the answer does not reference the instance", status
        )
    raise PermanentPushError(f"STOW-RS HTTP {status}", status)


def _dicom_json(response: httpx.Response) -> dict[str, Any]:
    """The Store Instances Response dataset (DICOM JSON); ``{}`` when there is none.

    DICOM JSON answers are an object, or (some servers) a list holding one.
    """
    if not response.content:
        return {}
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}  # an XML (application/dicom+xml) or HTML answer: read the status only
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    return body if isinstance(body, dict) else {}


def _items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = body.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _referenced(body: dict[str, Any], sop: str) -> tuple[bool, str | None]:
    for item in _items(body, "00081199"):
        if _first(item, "00081155") == sop:
            url = _first(item, "00081190")
            return True, url if isinstance(url, str) else None
    return False, None


def _failure_reasons(body: dict[str, Any], sop: str) -> set[int]:
    reasons = set()
    for item in _items(body, "00081198"):
        if _first(item, "00081155") not in (sop, None):
            continue
        reason = _first(item, "00081197")
        if isinstance(reason, int):
            reasons.add(reason)
        elif isinstance(reason, str) and reason.strip().isdigit():
            reasons.add(int(reason))
    return reasons
