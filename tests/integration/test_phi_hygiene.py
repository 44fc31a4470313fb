"""No patient data in kgdx's logs, error bodies, metrics or audit trail, end to end.

A real ``kgdx serve`` (logging at DEBUG to a file, :mod:`tests.kgdx_server`) with a real
Orthanc as its SR destination (:mod:`tests.orthanc`) receives a radiograph built from a real
NIH chest X-ray whose PatientName, PatientID, PatientBirthDate, AccessionNumber and UIDs are
fresh random values. The DICOM goes through ``POST /v1/predict`` (with the patient's name in
the clinical text), STOW-RS (so the study worker scores it, builds the SR and pushes it to
Orthanc), the report routes, and error paths: truncated, wrong scope, invalid key, bad
options, a study UID mismatch. Then none of the planted values may appear in any line the
server logged, in any error body, in ``/metrics`` or in any table but the one that keeps the
SRs; the UIDs appear in the log and the audit trail only hashed. The SR itself carries the
patient into the PACS, as it must.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Pacs, real_radiograph
from tests.orthanc import wait_for
from tests.service.images import truncated, write_dicom

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

#: Study stable -> job -> inference -> SR -> push to Orthanc, on a busy machine.
SR_TIMEOUT_S = 120.0
#: The one table that may hold patient data: the SRs (Part 10 bytes) kgdx pushes.
PHI_TABLES = {"svc_job_srs"}


def _hash_uid(home: Path, uid: str) -> str:
    """The server's pseudonym of ``uid`` (:func:`service.logs.hash_uid` under its salt)."""
    salt = (home / "uid_salt").read_text(encoding="utf-8").strip().encode()
    return hmac.new(salt, uid.encode(), hashlib.sha256).hexdigest()[:16]


def _tables(db: Path) -> dict[str, str]:
    """Every table of the service database, its rows as text."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            name: "\n".join(repr(row) for row in conn.execute(f'SELECT * FROM "{name}"'))
            for name in names
        }


@pytest.mark.timeout(600)
def test_patient_data_never_reaches_logs_errors_metrics_or_audit(
    make_pacs: Callable[..., Pacs],
) -> None:
    pacs = make_pacs(KGDX_STABLE_SECONDS="1", KGDX_LOG_LEVEL="DEBUG")
    kgdx, key = pacs.kgdx, pacs.read_key  # read_key: predict, ingest and admin
    rng = random.Random(secrets.randbits(64))
    tag = secrets.token_hex(4)
    family, given = f"Zq{tag}fam", f"Xw{tag}giv"
    patient_id = f"PID{secrets.token_hex(6)}"
    accession = f"AC{secrets.token_hex(6)}"
    birth = f"19{rng.randint(10, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    _, ds = real_radiograph(
        patient_name=f"{family}^{given}", patient_id=patient_id, accession=accession
    )
    ds.PatientBirthDate = birth
    dicom = write_dicom(ds)
    uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    planted = [family, given, patient_id, accession, birth]

    def stow(data: bytes, path: str = "/dicomweb/studies", auth: str = key) -> Any:
        boundary = secrets.token_hex(8)
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return kgdx.request(
            "POST", path, auth, content=body, headers={"Content-Type": ctype}, timeout=60
        )

    def predict(data: bytes, auth: str = key, **form: str) -> Any:
        files = {"file": ("study.dcm", data, "application/dicom")}
        return kgdx.request("POST", "/v1/predict", auth, files=files, data=form, timeout=60)

    # -- the happy paths: predict, STOW -> job -> SR -> Orthanc, the report routes
    ok = predict(dicom, text=f"{given} {family} has a cough")
    assert ok.status_code == 200, ok.text
    stored = stow(dicom)
    assert stored.status_code == 200, stored.text
    srs = wait_for(
        lambda: pacs.orthanc.search_sr(uids[0]),
        SR_TIMEOUT_S,
        interval=0.5,
        what="kgdx's SR in Orthanc",
    )
    assert len(srs) == 1, pacs.diagnostics()
    status = wait_for(
        lambda: (s := pacs.study_status(uids[0])) and s["status"] == "done" and s,
        SR_TIMEOUT_S,
        what="the study to settle as done",
    )
    result_id = ok.json()["id"]
    fhir = kgdx.get(f"/v1/results/{result_id}/fhir?patient=Patient/{patient_id}", key)
    assert fhir.status_code == 200
    assert kgdx.get(f"/v1/results/{result_id}/sr", key).status_code == 200

    # -- the error paths
    errors = {
        "predict-truncated": predict(truncated(dicom, 0.6)),
        "predict-wrong-scope": predict(dicom, auth=pacs.ingest_key),
        "predict-bad-options": predict(dicom, threshold=patient_id, top_k_paths="99"),
        "predict-bad-key": predict(dicom, auth=f"kgdx_0123456789ab_{patient_id}" + "A" * 30),
        # cut inside the patient's name: no Study / Series UID follows
        "stow-cut-in-the-name": stow(dicom[: dicom.index(given.encode()) + 3]),
        "stow-study-mismatch": stow(dicom, path="/dicomweb/studies/1.2.3.4"),
        "stow-bad-key": stow(dicom, auth="kgdx_00_bad"),
        "stow-not-dicom": stow(f"{family}^{given} {patient_id}".encode()),
        "study-unknown": kgdx.get("/v1/studies/1.2.3.999", key),
    }
    want = {
        "predict-truncated": 422,
        "predict-wrong-scope": 403,
        "predict-bad-options": 422,
        "predict-bad-key": 401,
        "stow-cut-in-the-name": 409,
        "stow-study-mismatch": 409,
        "stow-bad-key": 401,
        "stow-not-dicom": 409,
        "study-unknown": 404,
    }
    assert {k: r.status_code for k, r in errors.items()} == want, {
        k: r.text[:200] for k, r in errors.items()
    }
    metrics = kgdx.get("/metrics").text

    # -- the SR carries the patient into the PACS, as it must
    client = pacs.orthanc.dicomweb_client()
    sr = client.retrieve_instance(
        uids[0], srs[0]["0020000E"]["Value"][0], srs[0]["00080018"]["Value"][0]
    )
    assert str(sr.PatientName) == f"{family}^{given}" and sr.PatientID == patient_id
    assert [j["state"] for j in status["jobs"]] == ["done"] and status["sr"]["pushed"] == 1

    # -- and nowhere else
    log = kgdx.log_text()
    assert '"logger": "kgdx.access"' in log and "/dicomweb/studies" in log  # it did log
    tables = _tables(kgdx.home / "kgdx.db")
    assert {"svc_audit", "svc_results", "svc_instances"} <= set(tables)
    assert tables.get("svc_job_srs")  # the SR was kept, with PHI
    leaks = {
        where: [p for p in planted if p in text]
        for where, text in {
            "log": log,
            "metrics": metrics,
            **{f"error body {k}": r.text for k, r in errors.items()},
            **{f"table {t}": rows for t, rows in tables.items() if t not in PHI_TABLES},
        }.items()
    }
    assert not {where: found for where, found in leaks.items() if found}
    clear_uids = {
        where: [u for u in uids if u in text]
        for where, text in {
            "log": log,
            "metrics": metrics,
            "audit": tables["svc_audit"],
        }.items()
    }
    assert not {where: found for where, found in clear_uids.items() if found}
    study_hash = _hash_uid(kgdx.home, uids[0])
    assert study_hash in log and study_hash in tables["svc_audit"]  # logged, hashed
