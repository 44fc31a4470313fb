"""The result as a TID 1500 SR: built with highdicom, written as Part 10, read back."""

from __future__ import annotations

import copy
import io
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from kg.ontology import Concept
from service.coding import ConceptCode, code_for_concept
from service.sr import (
    ABSENT,
    EXPLANATION_PATH,
    PRESENT,
    PROBABILITY,
    build_sr,
    derive_uid,
    is_present_code,
    path_text,
    sr_bytes,
)
from tests.service import images

ONTOLOGY_VERSION = "0123456789abcdef"


def make_payload() -> dict[str, Any]:
    """A result as ``POST /v1/predict`` answers it (heat maps and evidence trimmed)."""

    def path(*labels: str, relation: str = "suggests", score: float = 0.5) -> dict[str, Any]:
        return {
            "nodes": [{"id": f"KGDX:{lab.lower()}", "label": lab} for lab in labels],
            "edges": [{"relation": relation, "direction": "forward"}] * (len(labels) - 1),
            "score": score,
        }

    return {
        "id": "0f" * 16,
        "created_at": "2025-03-01T10:20:30+00:00",
        "model": {"name": "kgdx-tiny", "version": "a1b2c3d4"},
        "ontology": {"name": "chest-cxr", "version": ONTOLOGY_VERSION},
        "image": {"kind": "dicom", "width": 64, "height": 64},
        "findings": [
            {
                "name": "Consolidation",
                "concept": {"id": "KGDX:2", "label": "Consolidation"},
                "probability": 0.812345,
                "threshold": 0.5,
                "positive": True,
                "heatmap": None,
                "evidence": [],
                "paths": [
                    path("Consolidation", "Pneumonia"),
                    path("Consolidation", "Pulmonary opacity", relation="is_a", score=1 / 3),
                ],
            },
            {
                "name": "Effusion",
                "concept": {"id": "KGDX:3", "label": "Pleural effusion"},
                "probability": 0.2,
                "threshold": 0.5,
                "positive": False,
                "heatmap": None,
                "evidence": [],
                "paths": [],
            },
            {
                "name": "Épanchement à droite",  # labels are not ASCII everywhere
                "concept": {"id": "KGDX:4", "label": "Épanchement à droite"},
                "probability": 0.55,
                "threshold": 0.6,
                "positive": False,
                "heatmap": None,
                "evidence": [],
                "paths": [path("Épanchement à droite", "Plèvre", relation="located_in")],
            },
        ],
    }


#: KGDX:2 has SNOMED CT and UMLS xrefs, KGDX:3 only UMLS, KGDX:4 none.
CONCEPTS = {
    "KGDX:2": Concept("KGDX:2", "Consolidation", xrefs=("UMLS:C0521530", "SNOMEDCT_US:95436008")),
    "KGDX:3": Concept("KGDX:3", "Pleural effusion", xrefs=("UMLS:C0032227",)),
}
EXPECTED_CODES = {
    "KGDX:2": ("95436008", "SCT"),
    "KGDX:3": ("C0032227", "UMLS"),
    "KGDX:4": ("KGDX:4", "99KGDX"),
}


def coder(concept_id: str, label: str | None = None) -> ConceptCode:
    return code_for_concept(
        CONCEPTS.get(concept_id), concept_id, label, ontology_version=ONTOLOGY_VERSION
    )


def read_back(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    data = sr_bytes(sr)
    assert data[128:132] == b"DICM", "a Part 10 file with preamble"
    back = hd.sr.srread(io.BytesIO(data))
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    return back


def groups_of(sr: hd.sr.Comprehensive3DSR) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return list(report_of(sr).get_image_measurement_groups())


def report_of(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    return cast(hd.sr.MeasurementReport, sr.content)


def finding_of(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> hd.sr.CodedConcept:
    found = group.finding_type
    assert found is not None
    return found


SOURCES = {
    "dx": lambda: images.dicom_dataset(modality="DX"),
    "cr": lambda: images.dicom_dataset(modality="CR", seed=1),
    # With the projection attributes, highdicom also writes an Image Library entry.
    "dx-described": lambda: images.dicom_dataset(
        modality="DX",
        PatientOrientation=["L", "F"],
        ImagerPixelSpacing=[0.2, 0.2],
        PatientSex="F",
        StudyID="S1",
        StudyDate="20250301",
        StudyTime="101500",
    ),
    "from-file": lambda: pydicom.dcmread(io.BytesIO(images.dicom_bytes(compression="rle"))),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_sr_reads_back_with_every_finding(kind: str) -> None:
    source = SOURCES[kind]()
    payload = make_payload()
    back = read_back(
        build_sr(payload, source=source, concept_codes=coder, instance_uid=derive_uid("t", kind))
    )

    # Same study and patient as the image; a new series of its own.
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(back).SOPClassUID
    assert back.Modality == "SR" and back.SeriesNumber == 9901
    assert str(back.PatientName) == images.PATIENT_NAME
    assert back.PatientID == images.PATIENT_ID
    assert back.AccessionNumber == images.ACCESSION_NUMBER
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert back.ContentDate == "20250301" and back.ContentTime == "102030"
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [source.SOPInstanceUID]
    assert "PixelData" not in back

    groups = groups_of(back)
    assert len(groups) == len(payload["findings"])
    for group, finding in zip(groups, payload["findings"], strict=True):
        cid = finding["concept"]["id"]
        value, scheme = EXPECTED_CODES[cid]
        assert (finding_of(group).value, finding_of(group).scheme_designator) == (value, scheme)
        assert finding_of(group).meaning == finding["concept"]["label"]

        (measurement,) = group.get_measurements(name=PROBABILITY)
        assert measurement.value == pytest.approx(finding["probability"])
        assert (measurement.unit.value, measurement.unit.scheme_designator) == ("1", "UCUM")

        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == finding_of(group)
        assert is_present_code(evaluation.value) is finding["positive"]
        assert evaluation.value == (PRESENT if finding["positive"] else ABSENT)

        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID

        algorithm = _algorithm(group)
        assert algorithm == {
            "Algorithm Name": ["kgdx-tiny"],
            "Algorithm Version": ["a1b2c3d4"],
            "Algorithm Parameters": [
                f"ontology=chest-cxr@{ONTOLOGY_VERSION}",
                f"threshold={finding['threshold']:g}",
            ],
        }
        texts = _paths(group)
        assert texts == [path_text(p) for p in finding["paths"]]

    first = _paths(groups[0])
    assert first == [
        "Consolidation -suggests-> Pneumonia (score 0.50)",
        "Consolidation -is_a-> Pulmonary opacity (score 0.33)",
    ]
    has_library = kind == "dx-described"
    assert _has_image_library(back) is has_library


def test_device_observer_and_private_schemes_are_declared() -> None:
    back = read_back(build_sr(make_payload(), source=SOURCES["dx"](), concept_codes=coder))
    (device,) = [
        c
        for c in report_of(back).get_observer_contexts()
        if c.observer_type.value == "121007"  # Device
    ]
    attrs = device.observer_identifying_attributes
    assert isinstance(attrs, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attrs.name == "kgdx-tiny" and attrs.model_name == "kgdx-tiny a1b2c3d4"
    assert attrs.manufacturer_name == "kgdx"
    schemes = {
        item.CodingSchemeDesignator: item for item in back.CodingSchemeIdentificationSequence
    }
    assert set(schemes) == {"99KGDX"}
    assert schemes["99KGDX"].CodingSchemeVersion == ONTOLOGY_VERSION
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.ContentQualification == "RESEARCH"
    assert back.Manufacturer == "kgdx" and back.SoftwareVersions == "a1b2c3d4"


def test_private_schemes_of_other_prefixes_are_declared() -> None:
    payload = make_payload()
    payload["findings"][1]["concept"]["id"] = "HP:0002202"
    back = read_back(build_sr(payload, source=SOURCES["dx"](), concept_codes=None))
    designators = {i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence}
    assert designators == {"99KGDX", "99HP"}
    assert finding_of(groups_of(back)[1]).scheme_designator == "99HP"


def test_uids_are_deterministic_when_the_instance_uid_is_given() -> None:
    source = SOURCES["dx"]()
    uid = derive_uid("job", 7)
    a = build_sr(make_payload(), source=source, concept_codes=coder, instance_uid=uid)
    b = build_sr(make_payload(), source=source, concept_codes=coder, instance_uid=uid)
    c = build_sr(make_payload(), source=source, concept_codes=coder, instance_uid=derive_uid(8))
    assert a.SOPInstanceUID == b.SOPInstanceUID == uid
    assert a.file_meta.MediaStorageSOPInstanceUID == uid
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != c.SeriesInstanceUID
    tracking = [[g.tracking_uid for g in groups_of(read_back(x))] for x in (a, b, c)]
    assert tracking[0] == tracking[1] and set(tracking[0]).isdisjoint(tracking[2])
    assert derive_uid("job", 7) == uid and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    given = build_sr(
        make_payload(),
        source=source,
        concept_codes=coder,
        instance_uid=uid,
        series_uid="1.2.3.4",
        series_number=42,
        instance_number=3,
    )
    assert (given.SeriesInstanceUID, given.SeriesNumber, given.InstanceNumber) == ("1.2.3.4", 42, 3)
    fresh = [build_sr(make_payload(), source=source, concept_codes=coder) for _ in range(2)]
    assert fresh[0].SOPInstanceUID != fresh[1].SOPInstanceUID


def test_without_a_source_the_sr_starts_an_anonymous_study() -> None:
    """A PNG has no study to join: a new study, no patient data, no image reference."""
    uid = derive_uid("png-result")
    back = read_back(build_sr(make_payload(), source=None, concept_codes=coder, instance_uid=uid))
    assert back.StudyInstanceUID == derive_uid(uid, "study")
    assert back.PatientIdentityRemoved == "YES"
    assert "not DICOM" in back.DeidentificationMethod
    assert back.PatientName == "" and back.PatientID == ""
    assert "CurrentRequestedProcedureEvidenceSequence" not in back
    assert "PertinentOtherEvidenceSequence" not in back
    groups = groups_of(back)
    assert len(groups) == 3 and all(not g.source_images for g in groups)
    assert finding_of(groups[0]).scheme_designator == "SCT"
    assert not _has_image_library(back)
    other = build_sr(make_payload(), source=None, concept_codes=coder, study_uid="1.2.3")
    assert other.StudyInstanceUID == "1.2.3"


def test_patient_data_goes_into_the_sr_but_never_into_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    data = sr_bytes(build_sr(make_payload(), source=SOURCES["dx"](), concept_codes=coder))
    assert images.PATIENT_NAME.encode() in data
    assert images.PATIENT_NAME not in caplog.text and images.PATIENT_ID not in caplog.text


def test_the_source_is_not_modified() -> None:
    source = SOURCES["dx"]()
    before = copy.deepcopy(source)
    build_sr(make_payload(), source=source, concept_codes=coder)
    assert source == before


def test_codes_fall_back_to_own_ids_without_a_lookup() -> None:
    back = read_back(build_sr(make_payload(), source=SOURCES["dx"](), concept_codes=None))
    codes = [(finding_of(g).value, finding_of(g).scheme_designator) for g in groups_of(back)]
    assert codes == [("KGDX:2", "99KGDX"), ("KGDX:3", "99KGDX"), ("KGDX:4", "99KGDX")]
    assert {finding_of(g).scheme_version for g in groups_of(back)} == {ONTOLOGY_VERSION}


def _broken(path: str, value: object) -> dict[str, Any]:
    payload = make_payload()
    target: Any = payload
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return payload


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("findings", [], "findings"),
        ("findings", "x", "findings"),
        ("findings.0.probability", 1.5, "probability"),
        ("findings.0.probability", "0.5", "probability"),
        ("findings.0.probability", True, "probability"),
        ("findings.0.probability", float("nan"), "probability"),
        ("findings.0.threshold", -0.1, "threshold"),
        ("findings.0.positive", "yes", "positive"),
        ("findings.0.concept", {"label": "x"}, "concept.id"),
        ("findings.0.concept", KeyError, "concept.id"),
        ("findings.0.paths", [1, 2], "paths"),
        ("model", "kgdx", "model"),
        ("created_at", "yesterday", "created_at"),
    ],
)
def test_malformed_payloads_are_refused_naming_the_field(
    path: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_sr(_broken(path, value), source=None, concept_codes=None)


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_a_source_without_its_uids_is_refused(missing: str) -> None:
    source = SOURCES["dx"]()
    delattr(source, missing)
    with pytest.raises(ValueError, match=missing):
        build_sr(make_payload(), source=source, concept_codes=None)


def test_positive_defaults_to_probability_at_or_above_threshold() -> None:
    payload = make_payload()
    for f in payload["findings"]:
        del f["positive"]
    groups = groups_of(read_back(build_sr(payload, source=None, concept_codes=None)))
    got = [is_present_code(g.get_qualitative_evaluations()[0].value) for g in groups]
    assert got == [True, False, False]


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (
            {
                "nodes": [{"id": "a", "label": "Pneumonia"}, {"id": "b", "label": "Bacterial"}],
                "edges": [{"relation": "is_a", "direction": "backward"}],
                "score": 0.25,
            },
            "Pneumonia <-is_a- Bacterial (score 0.25)",
        ),
        ({"nodes": [{"id": "KGDX:9", "label": ""}], "edges": []}, "KGDX:9"),
    ],
)
def test_path_text(path: dict[str, Any], text: str) -> None:
    assert path_text(path) == text


@pytest.mark.parametrize(
    ("code", "present"),
    [
        (PRESENT, True),
        (ABSENT, False),
        (hd.sr.CodedConcept("272519000", "SCT", "Absent"), False),
        (hd.sr.CodedConcept("373068000", "SCT", "Undetermined"), None),
    ],
)
def test_is_present_code(code: hd.sr.CodedConcept, present: bool | None) -> None:
    assert is_present_code(code) is present


def _paths(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [item.value for item in group[0].ContentSequence.find(EXPLANATION_PATH)]


def _algorithm(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in group[0].ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if name.startswith("Algorithm"):
            out.setdefault(name, []).append(item.TextValue)
    return out


def _has_image_library(sr: Dataset) -> bool:
    return any(
        item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
        for item in sr.ContentSequence
    )


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK's dsrdump is not installed")
@pytest.mark.parametrize("with_source", [True, False])
def test_dcmtk_reads_the_sr(tmp_path: Path, with_source: bool) -> None:
    """An independent SR reader (DCMTK) parses the document without errors."""
    source = SOURCES["dx-described"]() if with_source else None
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes(build_sr(make_payload(), source=source, concept_codes=coder)))
    done = subprocess.run(
        ["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert '"Ontology explanation path"' in done.stdout
    assert "(95436008,SCT," in done.stdout
