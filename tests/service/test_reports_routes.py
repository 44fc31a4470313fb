"""``GET /v1/results/{id}/sr`` and ``/fhir`` on the served tiny model, read back for real."""

from __future__ import annotations

import io
from typing import Any, cast

import highdicom as hd
import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from kg.ontology import Concept
from service.results import StoredResult
from service.routes.reports import SR_SOURCE_KEY
from service.sr import derive_uid, is_present_code
from service.state import AppState
from tests.service import images
from tests.service.conftest import Served

PNG = images.png_bytes(width=64, height=48)


def _predict(served: Served, data: bytes = PNG, name: str = "x.png") -> dict[str, Any]:
    r = served.client.post(
        "/v1/predict",
        files={"file": (name, data, "application/octet-stream")},
        headers=served.auth("predict"),
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _state(served: Served) -> AppState:
    return cast(AppState, served.client.app.state.kgdx)  # type: ignore[attr-defined]


def _groups(data: bytes) -> tuple[hd.sr.Comprehensive3DSR, list[Any]]:
    sr = hd.sr.srread(io.BytesIO(data))
    report = cast(hd.sr.MeasurementReport, sr.content)
    return cast(hd.sr.Comprehensive3DSR, sr), list(report.get_image_measurement_groups())


def test_sr_of_a_png_result_is_a_new_anonymous_study(served: Served) -> None:
    body = _predict(served)
    r = served.client.get(f"/v1/results/{body['id']}/sr", headers=served.auth())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["x-kgdx-sr-study"] == "new"
    assert body["id"] in r.headers["content-disposition"]
    sr, groups = _groups(r.content)
    assert sr.SOPInstanceUID == derive_uid("result", body["id"], "sr")
    assert sr.PatientIdentityRemoved == "YES"
    assert len(groups) == len(body["findings"])
    for group, finding in zip(groups, body["findings"], strict=True):
        assert group.finding_type.value == finding["concept"]["id"]
        assert group.finding_type.scheme_designator == "99X"  # the tiny ontology's own ids
        assert group.finding_type.scheme_version == body["ontology"]["version"]
        (m,) = group.get_measurements()
        assert m.value == pytest.approx(finding["probability"])
        (q,) = group.get_qualitative_evaluations()
        assert is_present_code(q.value) is finding["positive"]
    # The dashed form of the id names the same result, and the SR is the same instance.
    rid = body["id"]
    dashed = f"{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:]}"
    again = served.client.get(f"/v1/results/{dashed.upper()}/sr", headers=served.auth())
    assert again.status_code == 200
    assert _groups(again.content)[0].SOPInstanceUID == sr.SOPInstanceUID


def test_sr_of_a_dicom_predict_result_has_no_patient_data(served: Served) -> None:
    """/v1/predict keeps no DICOM, so its SR cannot join the study (documented limit)."""
    source = images.dicom_dataset(modality="DX")
    body = _predict(served, images.write_dicom(source), "x.dcm")
    r = served.client.get(f"/v1/results/{body['id']}/sr", headers=served.auth())
    assert r.status_code == 200 and r.headers["x-kgdx-sr-study"] == "new"
    assert images.PATIENT_NAME.encode() not in r.content
    assert images.PATIENT_ID.encode() not in r.content
    sr, _ = _groups(r.content)
    assert sr.StudyInstanceUID != source.StudyInstanceUID


def test_a_registered_source_puts_sr_and_fhir_in_the_images_study(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = images.dicom_dataset(modality="DX", PatientSex="F")
    body = _predict(served, images.write_dicom(source), "x.dcm")
    state = _state(served)
    asked: list[str] = []

    def find_source(stored: StoredResult) -> pydicom.Dataset | None:
        asked.append(stored.id)
        return source if stored.id == body["id"] else None

    state.extras[SR_SOURCE_KEY] = find_source
    # The effusion concept gets a SNOMED CT xref, as the bundled chest ontology has.
    assert state.store is not None
    original = state.store.concept

    def with_xrefs(cid: str, ref: str | None = None) -> Concept:
        concept = original(cid, ref)
        if cid == "X:effusion":
            concept.xrefs = ("UMLS:C0032227", "SNOMEDCT_US:60046008")
        return concept

    monkeypatch.setattr(state.store, "concept", with_xrefs)

    r = served.client.get(f"/v1/results/{body['id']}/sr", headers=served.auth())
    assert r.status_code == 200 and r.headers["x-kgdx-sr-study"] == "source"
    sr, groups = _groups(r.content)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert str(sr.PatientName) == images.PATIENT_NAME
    assert all(
        g.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID for g in groups
    )
    codes = {g.finding_type.meaning: g.finding_type for g in groups}
    effusion = codes["Pleural effusion"]
    assert (effusion.value, effusion.scheme_designator) == ("60046008", "SCT")

    f = served.client.get(
        f"/v1/results/{body['id']}/fhir?patient=Patient/42", headers=served.auth()
    )
    assert f.status_code == 200, f.text
    report = f.json()
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{source.StudyInstanceUID}"
    assert report["subject"] == {"reference": "Patient/42"}
    (obs,) = [o for o in report["contained"] if o.get("code", {}).get("text") == "Effusion"]
    assert obs["code"]["coding"][0]["system"] == "http://snomed.info/sct"
    assert obs["code"]["coding"][0]["code"] == "60046008"
    assert obs["derivedFrom"] == report["imagingStudy"]
    assert asked == [body["id"], body["id"]]


def test_fhir_of_a_result(served: Served) -> None:
    body = _predict(served)
    r = served.client.get(f"/v1/results/{body['id']}/fhir", headers=served.auth())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/fhir+json"
    report = r.json()
    DiagnosticReport.model_validate(report)
    observations = [o for o in report["contained"] if o["resourceType"] == "Observation"]
    assert len(observations) == len(body["findings"])
    got = [o["interpretation"][0]["coding"][0]["code"] == "POS" for o in observations]
    assert got == [f["positive"] for f in body["findings"]]
    assert "imagingStudy" not in report and "subject" not in report


@pytest.mark.parametrize("kind", ["sr", "fhir"])
def test_errors(served: Served, kind: str) -> None:
    c = served.client
    unknown = c.get(f"/v1/results/{'ab' * 16}/{kind}", headers=served.auth())
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    for bad in ("not-an-id", "..%5Cwin", "1234", "ab" * 17, "zz" * 16):
        r = c.get(f"/v1/results/{bad}/{kind}", headers=served.auth())
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    assert c.get(f"/v1/results/{'ab' * 16}/{kind}").status_code == 401
    assert (
        c.get(f"/v1/results/{'ab' * 16}/{kind}", headers=served.auth("ingest")).status_code == 403
    )
    if kind == "fhir":
        body = _predict(served)
        r = c.get(f"/v1/results/{body['id']}/fhir?patient=a%20b", headers=served.auth())
        assert r.status_code == 422


@pytest.mark.parametrize("patient", ["%1D", "P%04x", "Patient/1%7F", "%1F%1C"])
def test_fhir_patient_with_control_characters_is_422(served: Served, patient: str) -> None:
    # Found by bench/fuzz_api.py: 0x1c-0x1f passed the route's \S (Rust regex) but not
    # build_fhir's (Python re), a 500.
    body = _predict(served)
    r = served.client.get(f"/v1/results/{body['id']}/fhir?patient={patient}", headers=served.auth())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
