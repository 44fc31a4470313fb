"""The result as a FHIR R4 DiagnosticReport with Observations, validated by fhir.resources (R4B)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from service.coding import SNOMED_SYSTEM, UMLS_SYSTEM
from service.fhir import build_fhir
from service.sr import path_text
from tests.service.test_sr import ONTOLOGY_VERSION, coder, make_payload

STUDY = "1.2.826.0.1.3680043.8.498.1234567890"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def contained(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in report["contained"] if r["resourceType"] == kind]


@pytest.mark.parametrize(
    ("patient_ref", "study_uid"),
    [("Patient/123", STUDY), (None, None), ("https://ehr.example/fhir/Patient/p-9", STUDY)],
)
def test_report_validates_with_one_observation_per_finding(
    patient_ref: str | None, study_uid: str | None
) -> None:
    payload = make_payload()
    report = build_fhir(payload, patient_ref=patient_ref, study_uid=study_uid, concept_codes=coder)
    json.dumps(report)  # plain JSON
    parsed = DiagnosticReport.model_validate(report)
    assert parsed.status == "final"
    assert report["resourceType"] == "DiagnosticReport" and report["id"] == payload["id"]
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["identifier"][0]["value"].startswith("urn:uuid:0f0f0f0f-")
    assert report["issued"] == report["effectiveDateTime"] == "2025-03-01T10:20:30Z"

    observations = contained(report, "Observation")
    assert len(observations) == len(payload["findings"])
    assert [r["reference"] for r in report["result"]] == [f"#{o['id']}" for o in observations]
    (device,) = contained(report, "Device")
    Device.model_validate(device)
    assert device["deviceName"][0]["name"] == "kgdx-tiny"
    assert [v["value"] for v in device["version"]] == [
        "a1b2c3d4",
        f"chest-cxr@{ONTOLOGY_VERSION}",
    ]

    for obs, finding in zip(observations, payload["findings"], strict=True):
        Observation.model_validate(obs)
        assert obs["status"] == "final"
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        assert obs["valueQuantity"] == {
            "value": pytest.approx(finding["probability"]),
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
        (interpretation,) = obs["interpretation"][0]["coding"]
        assert interpretation["system"] == INTERPRETATION
        assert interpretation["code"] == ("POS" if finding["positive"] else "NEG")
        assert obs["device"]["reference"] == "#model"
        assert "kgdx-tiny a1b2c3d4" in obs["method"]["text"]
        assert f"chest-cxr@{ONTOLOGY_VERSION}" in obs["method"]["text"]
        notes = [n["text"] for n in obs["note"]]
        assert notes[1:] == [f"Explanation path: {path_text(p)}" for p in finding["paths"]]
        if patient_ref:
            assert obs["subject"] == {"reference": patient_ref}
        else:
            assert "subject" not in obs
        if study_uid:
            assert obs["derivedFrom"] == [
                {
                    "type": "ImagingStudy",
                    "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
                }
            ]
        else:
            assert "derivedFrom" not in obs

    if study_uid:
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    else:
        assert "imagingStudy" not in report
    assert ("subject" in report) is bool(patient_ref)


def test_codes_and_conclusion_name_the_positive_findings() -> None:
    report = build_fhir(make_payload(), patient_ref=None, study_uid=None, concept_codes=coder)
    observations = contained(report, "Observation")
    first = observations[0]["code"]["coding"]
    assert [(c["system"], c["code"]) for c in first] == [
        (SNOMED_SYSTEM, "95436008"),
        (UMLS_SYSTEM, "C0521530"),
        ("urn:kgdx:ontology:KGDX", "KGDX:2"),
    ]
    assert observations[1]["code"]["coding"][0]["system"] == UMLS_SYSTEM
    own = observations[2]["code"]["coding"][0]
    assert own["code"] == "KGDX:4" and own["version"] == ONTOLOGY_VERSION
    positives = [
        o["code"]["text"]
        for o in observations
        if o["interpretation"][0]["coding"][0]["code"] == "POS"
    ]
    assert positives == ["Consolidation"]
    assert report["conclusion"] == "Positive findings: Consolidation (0.81)."
    assert [c["coding"][0]["code"] for c in report["conclusionCode"]] == ["95436008"]
    assert "Épanchement à droite" in report["text"]["div"]


def test_no_positive_findings() -> None:
    payload = make_payload()
    for f in payload["findings"]:
        f["positive"] = False
    report = build_fhir(payload, patient_ref=None, study_uid=None, concept_codes=None)
    assert report["conclusion"] == "No positive findings among 3 assessed."
    assert "conclusionCode" not in report
    DiagnosticReport.model_validate(report)


def test_labels_are_escaped_in_the_narrative() -> None:
    payload = make_payload()
    payload["findings"][0]["name"] = "<script>alert(1)</script>"
    report = build_fhir(payload, patient_ref=None, study_uid=None, concept_codes=None)
    assert "<script>" not in report["text"]["div"] and "&lt;script&gt;" in report["text"]["div"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"study_uid": "not a uid"}, "study_uid"),
        ({"study_uid": "1." + "2" * 70}, "study_uid"),
        ({"patient_ref": "Patient 123"}, "patient_ref"),
        ({"patient_ref": ""}, "patient_ref"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"patient_ref": None, "study_uid": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_fhir(make_payload(), concept_codes=None, **args)


def test_malformed_payload_is_refused() -> None:
    payload = make_payload()
    payload["findings"][0]["probability"] = 7
    with pytest.raises(ValueError, match="probability"):
        build_fhir(payload, patient_ref=None, study_uid=None, concept_codes=None)
