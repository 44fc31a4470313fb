"""Structured JSON logs that carry request ids and never patient data.

:func:`configure_logging` puts one handler on the root logger: one JSON object per line on
stderr with ``ts``, ``level``, ``logger``, ``msg``, ``request_id`` (from
:data:`request_id_var`, set per request by the HTTP layer) and any ``extra=`` fields.

PHI stays out by construction: code logs :func:`hash_uid` of DICOM UIDs and never patient
attributes. :class:`PhiFilter` on the handler is the last line of defence: it redacts what it
can recognise (``PatientName=...``, ``PatientID``, ``PatientBirthDate``, ``AccessionNumber``,
pydicom dataset lines and DICOM JSON of the patient group, ``Doe^John``-style person names,
clear DICOM UIDs after a UID keyword or in a ``/studies/<uid>`` path (replaced by their hash),
API keys, kept only down to their public key id, and the values that pydicom's and
Python's own messages quote, e.g. ``Invalid value for VR DA: '...'``). Python warnings are
routed through it too (:func:`logging.captureWarnings`).

Example::

    configure_logging("INFO")
    token = request_id_var.set("3f2a...")
    log.info("stored result", extra={"result_id": rid, "study": hash_uid(study_uid)})
    request_id_var.reset(token)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kg.home import kgdx_home

#: The id of the request being served, for every log line written while serving it.
request_id_var: ContextVar[str | None] = ContextVar("kgdx_request_id", default=None)

#: Environment variable holding the UID hashing salt; replicas sharing a database must agree.
SALT_ENV = "KGDX_UID_SALT"
#: File under ``$KGDX_HOME`` holding the generated salt when ``$KGDX_UID_SALT`` is unset.
SALT_FILE = "uid_salt"
#: Hex digits kept of the UID hash: 64 bits, collision-free at any realistic archive size.
HASH_HEX = 16

REDACTED = "***"

# -- UID hashing ---------------------------------------------------------------------------

_salts: dict[tuple[str | None, str | None], bytes] = {}
_salts_lock = threading.Lock()


def hash_uid(uid: str | None) -> str | None:
    """A stable pseudonym of a DICOM UID: HMAC-SHA256 under the installation salt, 16 hex.

    The salt is ``$KGDX_UID_SALT`` when set, else a random one created once in
    ``$KGDX_HOME/uid_salt`` (mode 0600), so hashes stay the same across restarts. It is never
    stored in the database: a database dump alone does not let anyone test guessed UIDs.
    Several replicas sharing one database must share ``$KGDX_UID_SALT`` to find each
    other's results by study.

    DICOM padding (trailing spaces or NULs) is ignored; ``None`` or an empty UID gives ``None``.
    """
    if uid is None:
        return None
    if not isinstance(uid, str):
        raise TypeError(f"uid must be a string or None, got {type(uid).__name__}")
    clean = uid.strip().rstrip("\x00").strip()
    if not clean:
        return None
    digest = hmac.new(_salt(), clean.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:HASH_HEX]


def _salt() -> bytes:
    env = os.environ.get(SALT_ENV) or None
    key = (env, None if env else os.environ.get("KGDX_HOME"))
    cached = _salts.get(key)
    if cached is not None:
        return cached
    with _salts_lock:
        if key not in _salts:
            _salts[key] = env.encode("utf-8") if env else _file_salt(kgdx_home() / SALT_FILE)
        return _salts[key]


def _file_salt(path: Path) -> bytes:
    """Read the salt file, creating it atomically (mode 0600) when it is missing."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
            # link() fails if another process won the race; then both use the winner's salt.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    salt = path.read_text(encoding="utf-8").strip()
    if len(salt) < 16:
        raise ValueError(f"UID salt file {path} is empty or too short; delete it or set {SALT_ENV}")
    return salt.encode("utf-8")


# -- redaction -----------------------------------------------------------------------------

_PHI_KEYWORDS = (
    "PatientName|PatientID|PatientBirthDate|PatientBirthTime|PatientAddress|"
    "PatientTelephoneNumbers|OtherPatientIDs|OtherPatientNames|PatientMotherBirthName|"
    "AccessionNumber|patient_name|patient_id|patient_birth_date|birth_date|"
    "accession_number|accession"
)
_QUOTED = r"'[^'\n]*'|\"[^\"\n]*\""
_UNQUOTED = r"[^,;&}\]\n]*?(?=\s+[\w'\"]+\s*[=:]|[,;&}\]\n]|$)"
# PatientName=Doe^John, 'PatientID': '123', "AccessionNumber": "A1", patient_name: Doe John
_KEY_VALUE = re.compile(
    rf"(?P<key>[\"']?\b(?:{_PHI_KEYWORDS})\b[\"']?\s*[=:]\s*)(?:{_QUOTED}|{_UNQUOTED})",
    re.IGNORECASE,
)
# pydicom: (0010,0010) Patient's Name   PN: 'Doe^John'  (the whole rest of the line)
_PYDICOM_LINE = re.compile(r"(?P<key>\((?:0010,[0-9A-Fa-f]{4}|0008,0050)\))[^\n]*")
_PYDICOM_NAMED = re.compile(
    r"(?P<key>\b(?:Patient's Name|Patient ID|Patient's Birth Date|Accession Number|"
    r"Other Patient IDs)\s+[A-Z]{2}:\s*)(?:" + _QUOTED + r"|\S+)"
)
# DICOM JSON: "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
_DICOM_JSON = re.compile(
    r"(?P<key>\"(?:0010[0-9A-Fa-f]{4}|00080050)\"\s*:\s*)\{(?:[^{}]|\{[^{}]*\})*\}"
)
# A DICOM person name: components joined by carets (Doe^John, Doe^John^^Dr).
_PERSON_NAME = re.compile(r"\b[^\W\d_][\w'.-]*(?:\^[\w'.-]*)+\^?[\w'.-]*")
_API_KEY = re.compile(r"\b(kgdx_[0-9a-f]{6,32}_)[A-Za-z0-9_-]+")
_CLEAR_UID = re.compile(
    r"(?P<key>\b(?:StudyInstanceUID|SeriesInstanceUID|SOPInstanceUID|"
    r"(?:study|series|sop|instance|sop_instance)_uid)[\"']?\s*[=:]\s*[\"']?)"
    r"(?P<uid>[0-9]+(?:\.[0-9]+){2,})",
    re.IGNORECASE,
)
# Library messages that quote the offending value, which may be any attribute of the patient:
# pydicom's "Invalid value for VR DA: '1970-01-0x'.", "Unable to convert '...' to 'DA'
# object", 'Value "..." is not valid for elements with a VR of IS', and Python's own
# "invalid literal for int() with base 10: '...'", "could not convert string to float: '...'",
# "time data '...' does not match format".
_VALUE_ECHO = re.compile(
    r"(?P<key>\bInvalid value for VR [A-Z]{2}: |\bUnable to convert |\bValue |"
    r"\binvalid literal for \w+\(\) with base \d+: |\bcould not convert \w+ to \w+: |"
    r"\btime data )"
    rf"(?:{_QUOTED})"
)
# DICOMweb and REST paths: /v1/studies/1.2.840..., /dicomweb/studies/.../series/...
_PATH_UID = re.compile(r"(?P<key>/(?:studies|series|instances)/)(?P<uid>[0-9]+(?:\.[0-9]+){2,})")
_PHI_FIELD = re.compile(rf"^(?:{_PHI_KEYWORDS})$", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every PHI pattern and API key secret it recognises replaced."""
    if not text:
        return text
    text = _API_KEY.sub(lambda m: m.group(1) + REDACTED, text)
    text = _VALUE_ECHO.sub(lambda m: m.group("key") + REDACTED, text)
    text = _DICOM_JSON.sub(lambda m: m.group("key") + f'"{REDACTED}"', text)
    text = _PYDICOM_LINE.sub(lambda m: m.group("key") + " " + REDACTED, text)
    text = _PYDICOM_NAMED.sub(lambda m: m.group("key") + REDACTED, text)
    text = _KEY_VALUE.sub(lambda m: m.group("key") + REDACTED, text)
    text = _CLEAR_UID.sub(lambda m: m.group("key") + f"#{hash_uid(m.group('uid'))}", text)
    text = _PATH_UID.sub(lambda m: m.group("key") + f"#{hash_uid(m.group('uid'))}", text)
    return _PERSON_NAME.sub(REDACTED, text)


def _redact_value(key: str, value: Any, depth: int = 0) -> Any:
    if _PHI_FIELD.match(key):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if depth >= 4:
        return value
    if isinstance(value, dict):
        return {str(k): _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value("", v, depth + 1) for v in value]
    return value


# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class PhiFilter(logging.Filter):
    """Redact recognisable PHI and API keys from a record's message and extra fields.

    Installed on the handler by :func:`configure_logging`, so it sees records of every logger.
    The message is formatted first (``msg % args``) so that PHI passed as an argument is caught
    too; extra fields named like patient attributes are blanked whatever their value.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the line
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for key, value in _extra_fields(record).items():
            setattr(record, key, _redact_value(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None  # formatted and redacted above; never format the raw one
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, request_id, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key, value in _extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the request id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = request_id_var.get()
        extra = _extra_fields(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return f"{line} [request_id={rid}]" if rid else line


class _KgdxHandler(logging.StreamHandler):
    """Marks the handler :func:`configure_logging` installs, so a second call replaces it."""


def configure_logging(level: str = "INFO", json_format: bool = True) -> None:
    """Send every log record to stderr, one JSON object per line, through :class:`PhiFilter`.

    Args:
        level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).
        json_format: ``False`` for plain text lines (a terminal), still redacted.

    Calling it again replaces the handler it installed; other handlers are left alone.
    """
    name = str(level).strip().upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(
            f"log level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got {level!r}"
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _KgdxHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _KgdxHandler(sys.stderr)
    handler.addFilter(PhiFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(name)
    # Library warnings (pydicom quotes the invalid value of any attribute, the patient's
    # birth date included) would go to stderr unfiltered; as records they pass PhiFilter.
    logging.captureWarnings(True)
