"""JSON logs with request ids; PHI and API keys redacted; UID hashes stable per installation."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service import logs
from service.logs import (
    PhiFilter,
    configure_logging,
    hash_uid,
    redact,
    request_id_var,
)

NAME = "Doe^Jane"
KEY = "kgdx_0123456789ab_" + "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3t"
SECRET = KEY.split("_", 2)[2]
UID = "1.2.826.0.1.3680043.8.498.987654321"


@pytest.fixture(autouse=True)
def clean_root(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore the root logger and forget cached salts after each test."""
    monkeypatch.delenv("KGDX_UID_SALT", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs._salts.clear()
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logs._salts.clear()


def lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_one_json_object_per_line_with_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    log = logging.getLogger("kgdx.test")
    token = request_id_var.set("req-42")
    try:
        log.info("stored %s", "result", extra={"result_id": "ab" * 16, "ms": 1.5})
    finally:
        request_id_var.reset(token)
    log.debug("hidden at INFO")
    log.warning("outside a request")
    first, second = lines(capsys.readouterr().err)
    assert first["msg"] == "stored result"
    assert first["level"] == "INFO" and first["logger"] == "kgdx.test"
    assert first["request_id"] == "req-42"
    assert first["result_id"] == "ab" * 16 and first["ms"] == 1.5
    assert first["ts"].endswith("+00:00")
    assert second["request_id"] is None and second["level"] == "WARNING"


def test_planted_phi_and_keys_never_reach_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG")
    log = logging.getLogger("kgdx.test")
    log.info("decoded PatientName=%s PatientID=PID-778899 age=40", NAME)
    log.info("header %s", {"PatientBirthDate": "19700101", "AccessionNumber": "ACC-5566"})
    log.info("(0010,0010) Patient's Name                      PN: 'Doe^Jane'")
    log.info('dicom json {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}}')
    log.info("auth with %s failed", KEY)
    log.info("person %s seen", NAME)
    log.info("study", extra={"patient_name": "Jane Doe", "detail": f"Bearer {KEY}"})
    log.info("StudyInstanceUID=%s", UID)
    try:
        raise ValueError(f"bad header PatientName={NAME}")
    except ValueError:
        log.exception("decode failed")
    err = capsys.readouterr().err
    records = lines(err)
    assert len(records) == 9
    for planted in (NAME, "Jane Doe", "PID-778899", "19700101", "ACC-5566", SECRET, UID):
        assert planted not in err, planted
    assert "kgdx_0123456789ab_***" in err  # the public key id stays for tracing
    assert f"#{hash_uid(UID)}" in err
    assert "age=40" in err  # what is not PHI is kept
    assert "decode failed" in err and "ValueError" in records[-1]["exc"]


def test_text_format_is_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_format=False)
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("kgdx.test").info("PatientName=%s key %s", NAME, KEY)
    finally:
        request_id_var.reset(token)
    err = capsys.readouterr().err
    assert NAME not in err and SECRET not in err
    assert "request_id=req-7" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


def test_configure_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    configure_logging("warning")
    logging.getLogger("kgdx.test").warning("once")
    assert len(lines(capsys.readouterr().err)) == 1
    with pytest.raises(ValueError, match="log level"):
        configure_logging("LOUD")


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("PatientName: Doe^John^^Dr", "John"),
        ("'PatientID': '12345'", "12345"),
        ('"AccessionNumber": "A-99"', "A-99"),
        ("patient_name=John Smith, status=200", "Smith"),
        ("Patient ID                        LO: 'PX-1'", "PX-1"),
        ("(0010,0030) Patient's Birth Date DA: '19800101'", "19800101"),
        (f"x-api-key: {KEY}", SECRET),
        ("sop_instance_uid=1.2.3.4.5", "1.2.3.4.5"),
        ('"GET /dicomweb/studies/1.2.840.1/series/1.2.840.2 HTTP/1.1" 200', "1.2.840."),
        # values quoted by pydicom's and Python's own messages
        ("UserWarning: Invalid value for VR DA: 'QZ7X0417'.", "QZ7X0417"),
        ("ValueError: Unable to convert 'QZ7X0417' to 'DA' object", "QZ7X0417"),
        ('Value "12ab" is not valid for elements with a VR of IS', "12ab"),
        ("invalid literal for int() with base 10: 'QZ7X'", "QZ7X"),
        ("could not convert string to float: 'Smith'", "Smith"),
        ("time data '1970-13-99' does not match format '%Y%m%d'", "1970-13-99"),
    ],
)
def test_redact_patterns(text: str, gone: str) -> None:
    assert gone not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "POST /v1/predict -> 200 in 12.5 ms",
        "study_uid_hash=0011aabbccdd2233 status=200",
        "loaded chest@3f2a with 6 concepts",
    ],
)
def test_redact_leaves_ordinary_lines_alone(text: str) -> None:
    assert redact(text) == text


def test_filter_blanks_phi_named_extra_fields() -> None:
    record = logging.LogRecord("t", logging.INFO, "f", 1, "ok %s", ("arg",), None)
    record.__dict__["PatientName"] = "Doe^Jane"  # as extra= would set them
    record.__dict__["nested"] = {"accession_number": "A1", "other": [f"key {KEY}"]}
    assert PhiFilter().filter(record)
    assert record.getMessage() == "ok arg"
    assert record.__dict__["PatientName"] == "***"
    assert record.__dict__["nested"] == {
        "accession_number": "***",
        "other": ["key kgdx_0123456789ab_***"],
    }


def test_hash_uid_is_stable_salted_and_short(tmp_home: Path) -> None:
    h = hash_uid(UID)
    assert h is not None and len(h) == 16 and int(h, 16) >= 0
    assert hash_uid(UID) == h
    assert hash_uid(f" {UID}\x00") == h  # DICOM padding
    assert hash_uid("1.2.3") != h
    assert hash_uid(None) is None and hash_uid("") is None and hash_uid("\x00") is None
    salt_file = tmp_home / logs.SALT_FILE
    assert stat.S_IMODE(os.stat(salt_file).st_mode) == 0o600
    logs._salts.clear()  # a restart: the persisted salt gives the same hash
    assert hash_uid(UID) == h


def test_hash_uid_salt_from_environment(
    tmp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = hash_uid(UID)
    monkeypatch.setenv("KGDX_UID_SALT", "shared-by-every-replica")
    shared = hash_uid(UID)
    assert shared != local
    monkeypatch.setenv("KGDX_HOME", str(tmp_path / "another-home"))
    assert hash_uid(UID) == shared  # the home no longer matters
    monkeypatch.delenv("KGDX_UID_SALT")
    assert hash_uid(UID) not in (shared, local)  # another installation, another salt


def test_short_salt_file_is_refused(tmp_home: Path) -> None:
    (tmp_home / logs.SALT_FILE).write_text("x\n")
    with pytest.raises(ValueError, match="salt"):
        hash_uid(UID)
