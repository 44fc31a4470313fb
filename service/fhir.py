"""A kgdx result as a FHIR R4 DiagnosticReport with one Observation per finding.

Validated with ``fhir.resources``' **R4B** classes (``fhir.resources.R4B``): the installed
package (8.x) has R5 at its top level and R4B and STU3 as subpackages, no plain R4. R4B
changed nothing that this report uses (DiagnosticReport, Observation, Device, Reference,
CodeableConcept, Quantity), so the JSON is valid R4 too.

Shape (the Observations and the Device are contained, so the report stands alone)::

    DiagnosticReport  status final, category RAD (v2-0074), code LOINC 18748-4
      "Diagnostic imaging study", subject (patient_ref), imagingStudy (by
      StudyInstanceUID), result -> #finding-1..n, conclusion (positive findings),
      conclusionCode (their codes)
    Observation #finding-i  status final, category imaging, code = the finding's concept
      (SNOMED CT, else UMLS, else the ontology's own id; further codes as extra codings),
      valueQuantity p (UCUM "1"), interpretation POS | NEG (v3-ObservationInterpretation),
      method (model + ontology version, threshold), device -> #model, derivedFrom the
      ImagingStudy, note: decision threshold and the explanation paths
    Device #model  the model's name and version, the ontology's name@version

The ImagingStudy is referenced by identifier (``urn:dicom:uid`` /
``urn:oid:<StudyInstanceUID>``), the way HL7's ImagingStudy and its DICOM SR mapping IG
identify a study, because kgdx does not know the EHR's ImagingStudy resource id.

Example::

    report = build_fhir(payload, patient_ref="Patient/123", study_uid=uid, concept_codes=coder)
    JSONResponse(report, media_type="application/fhir+json")
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from service.coding import LOINC_SYSTEM, UCUM_SYSTEM, ConceptCodes, resolve_code
from service.sr import created_at_of, findings_of, identity_of, path_text

__all__ = ["FHIR_MEDIA_TYPE", "build_fhir"]

FHIR_MEDIA_TYPE = "application/fhir+json"

_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_DICOM_UID = "urn:dicom:uid"
_RFC3986 = "urn:ietf:rfc:3986"
_REPORT_CODE = {"system": LOINC_SYSTEM, "code": "18748-4", "display": "Diagnostic imaging study"}
_POS = {"system": _INTERPRETATION, "code": "POS", "display": "Positive"}
_NEG = {"system": _INTERPRETATION, "code": "NEG", "display": "Negative"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_REF = re.compile(r"\S{1,1024}")
_DEVICE_ID = "model"


def build_fhir(
    payload: Mapping[str, Any],
    *,
    patient_ref: str | None,
    study_uid: str | None,
    concept_codes: ConceptCodes,
) -> dict[str, Any]:
    """The result ``payload`` as an R4 DiagnosticReport (a JSON-ready dict), validated.

    Args:
        payload: the result JSON (see :func:`service.sr.build_sr`).
        patient_ref: the EHR's patient reference (``Patient/123`` or an absolute URL) for
            ``subject``; None leaves the subject out (kgdx does not know the EHR's ids).
        study_uid: the StudyInstanceUID the result came from, for ``imagingStudy`` and each
            Observation's ``derivedFrom``; None when the input was not DICOM.
        concept_codes: concept id -> code, as for :func:`service.sr.build_sr`.

    Raises:
        ValueError: a malformed payload, a ``study_uid`` that is not a DICOM UID, or a
            ``patient_ref`` with spaces (each names the value).
    """
    findings = findings_of(payload)
    model = identity_of(payload, "model")
    ontology = identity_of(payload, "ontology")
    when = created_at_of(payload.get("created_at")).isoformat(timespec="seconds")
    if study_uid is not None and (
        not isinstance(study_uid, str) or len(study_uid) > 64 or not _UID.fullmatch(study_uid)
    ):
        raise ValueError(f"study_uid must be a DICOM UID, got {study_uid!r:.80}")
    if patient_ref is not None and (
        not isinstance(patient_ref, str) or not _REF.fullmatch(patient_ref)
    ):
        raise ValueError(
            f"patient_ref must be a reference like 'Patient/123', got {patient_ref!r:.80}"
        )

    subject = {"reference": patient_ref} if patient_ref else None
    study = (
        {
            "type": "ImagingStudy",
            "identifier": {"system": _DICOM_UID, "value": f"urn:oid:{study_uid}"},
        }
        if study_uid
        else None
    )
    onto = f"{ontology['name']}@{ontology['version']}"
    model_text = f"{model['name']} {model['version']}".strip() or "kgdx"
    device = {
        "resourceType": "Device",
        "id": _DEVICE_ID,
        "manufacturer": "kgdx",
        "deviceName": [{"name": model["name"] or "kgdx", "type": "model-name"}],
        "type": {"text": "Knowledge-graph-augmented image classification model"},
        "version": [
            {"type": {"text": "model"}, "value": model["version"] or "unknown"},
            {"type": {"text": "ontology"}, "value": onto},
        ],
    }
    observations = []
    positives = []
    for i, f in enumerate(findings, start=1):
        code = resolve_code(
            concept_codes,
            f["concept"]["id"],
            f["concept"].get("label") or f["name"],
            ontology_version=ontology["version"] or None,
        )
        concept = {"coding": code.fhir_codings(), "text": f["name"]}
        if f["positive"]:
            positives.append((f, concept))
        notes = [{"text": f"Decision threshold {f['threshold']:g}: positive at or above it."}]
        notes += [{"text": f"Explanation path: {path_text(p)}"} for p in f["paths"]]
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"finding-{i}",
            "status": "final",
            "category": [
                {"coding": [{"system": _OBS_CATEGORY, "code": "imaging", "display": "Imaging"}]}
            ],
            "code": concept,
            "effectiveDateTime": when,
            "issued": when,
            "valueQuantity": {
                "value": f["probability"],
                "unit": "1",
                "system": UCUM_SYSTEM,
                "code": "1",
            },
            "interpretation": [{"coding": [_POS if f["positive"] else _NEG]}],
            "method": {
                "text": f"{model_text} (AI model) with ontology {onto}; "
                f"threshold {f['threshold']:g}"
            },
            "device": {"reference": f"#{_DEVICE_ID}", "display": model_text},
            "note": notes,
        }
        if subject:
            obs["subject"] = subject
        if study:
            obs["derivedFrom"] = [study]
        observations.append(obs)

    if positives:
        listed = ", ".join(f"{f['name']} ({f['probability']:.2f})" for f, _ in positives)
        conclusion = f"Positive findings: {listed}."
    else:
        conclusion = f"No positive findings among {len(findings)} assessed."
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [{"coding": [{"system": _V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [_REPORT_CODE], "text": "AI findings (kgdx)"},
        "effectiveDateTime": when,
        "issued": when,
        "result": [
            {"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations
        ],
        "conclusion": conclusion,
        "contained": [*observations, device],
        "text": {"status": "generated", "div": _narrative(findings, conclusion, model_text)},
    }
    report = {k: v for k, v in report.items() if v is not None}
    rid = payload.get("id")
    if isinstance(rid, str) and re.fullmatch(r"[0-9a-f]{32}", rid):
        report["id"] = rid
        uuid = f"{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:]}"
        report["identifier"] = [{"system": _RFC3986, "value": f"urn:uuid:{uuid}"}]
    if subject:
        report["subject"] = subject
    if study:
        report["imagingStudy"] = [study]
    if positives:
        report["conclusionCode"] = [concept for _, concept in positives]

    for resource in observations:
        Observation.model_validate(resource)
    Device.model_validate(device)
    validated = DiagnosticReport.model_validate(report)
    out: dict[str, Any] = validated.model_dump(mode="json", exclude_none=True)
    return out


def _narrative(findings: list[dict[str, Any]], conclusion: str, model_text: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(f['name'])}</td><td>{f['probability']:.2f}</td>"
        f"<td>{'positive' if f['positive'] else 'negative'}</td></tr>"
        for f in findings
    )
    return (
        '<div xmlns="http://www.w3.org/1999/xhtml">'
        f"<p>{html.escape(conclusion)}</p>"
        "<table><tr><th>Finding</th><th>Probability</th><th>Result</th></tr>"
        f"{rows}</table><p>{html.escape(model_text)}; not verified by a clinician.</p></div>"
    )
