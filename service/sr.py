"""A kgdx result as a DICOM Structured Report: TID 1500 Measurement Report, built with highdicom.

The SR joins the source image's study (same StudyInstanceUID, the source's patient and study
attributes copied, as DICOM expects of a derived object) so the PACS files it beside the
radiograph. Its content tree, read by any TID 1500 consumer::

    Imaging Measurement Report (126000, DCM)
      Observation context: device observer = the model (name, version)
      Procedure reported: Imaging procedure (363679005, SCT)
      Image library: the source image
      Imaging Measurements
        Measurement Group (TID 1501), one per finding
          Tracking identifier / UID
          Finding (121071, DCM) = the finding's concept (SCT, else UMLS, else 99<prefix>)
          Algorithm identification (TID 4019): model name, version, parameters
              ("ontology=<name>@<version>", "threshold=<t>")
          Source image for measurement group: the source image
          NUM Probability (122157, DCM) = p, units (1, UCUM, "no units"), p in [0, 1]
          CODE <the finding's concept> = Present (52101004, SCT) | Absent (2667000, SCT)
          TEXT Ontology explanation path (EXPLPATH, 99KGDX) =
              "Consolidation -suggests-> Pneumonia (score 0.50)", one per path

Code choices: "Present"/"Absent" are SNOMED CT qualifier values (52101004, 2667000; the
Present-Absent pair SNOMED and HL7 use; older DICOM CID 240 editions list 272519000
"Absence findings" for Absent, which :func:`is_present_code` also reads). The probability is a
unitless fraction, so its unit is UCUM ``1`` ("no units", CID 7181), not percent. The
explanation path has no standard concept name, so it is a private code of ``99KGDX``
(PS3.3 section 8.2: designators starting with ``99`` are private), declared in the Coding
Scheme Identification Sequence with the ontology's private schemes.

Without a source dataset (a PNG sent to ``POST /v1/predict``) the SR starts a new study whose
patient is empty and marked anonymous (Patient Identity Removed = YES), and it references no
image. Patient data from the source is written into the SR (it belongs there) but this module
never logs it.

Example::

    sr = build_sr(payload, source=ds, concept_codes=coder, instance_uid=uid)
    data = sr_bytes(sr)   # a Part 10 file, application/dicom
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from service.coding import PRIVATE_SCHEME, ConceptCode, ConceptCodes, resolve_code

__all__ = [
    "ABSENT",
    "EXPLANATION_PATH",
    "NO_UNITS",
    "PRESENT",
    "PROBABILITY",
    "build_sr",
    "created_at_of",
    "derive_uid",
    "findings_of",
    "identity_of",
    "is_present_code",
    "path_text",
    "sr_bytes",
]

#: Name of each finding's probability measurement.
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
#: UCUM "no units": the probability is a fraction in [0, 1].
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
#: Older DICOM editions' "Absent" (CID 240 / 241); read back as absent too.
_ABSENT_OLD = ("272519000", "SCT")
#: Name of the TEXT items that carry the ontology paths explaining a finding.
EXPLANATION_PATH = hd.sr.CodedConcept("EXPLPATH", PRIVATE_SCHEME, "Ontology explanation path")
#: What the report is about when the caller does not say.
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")

_UID_ROOT = "kgdx-sr"
# Attributes highdicom reads from the source (Type 2 in the SR: present, may be empty).
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def derive_uid(*parts: object) -> str:
    """A DICOM UID derived from ``parts`` (the same parts give the same UID)."""
    return str(generate_uid(entropy_srcs=[_UID_ROOT, *(str(p) for p in parts)]))


def build_sr(
    payload: Mapping[str, Any],
    *,
    source: Dataset | None,
    concept_codes: ConceptCodes,
    series_number: int = 9901,
    instance_uid: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "kgdx",
    institution_name: str | None = None,
    procedure_reported: hd.sr.CodedConcept | None = None,
    content_qualification: str = "RESEARCH",
) -> hd.sr.Comprehensive3DSR:
    """The result ``payload`` (``POST /v1/predict``'s JSON) as a TID 1500 Comprehensive 3D SR.

    Args:
        payload: the result: ``findings`` (``name``, ``concept {id, label}``,
            ``probability``, ``threshold``, ``positive``, ``paths``), ``model {name,
            version}``, ``ontology {name, version}``, ``created_at``, ``id``.
        source: the analysed image (its header is enough: pixel data is never read); the SR
            joins its study and references it. None: a new anonymous study, no reference.
        concept_codes: concept id -> code (see :func:`service.coding.resolve_code`), e.g. a
            :class:`service.coding.ConceptCoder`; None codes every finding by its own id.
        series_number: Series Number of the SR series.
        instance_uid: SOP Instance UID; give one derived from the job (for instance with
            :func:`derive_uid`) so a rebuilt SR is the same instance. None: a new UID.
        series_uid: Series Instance UID; by default derived from ``instance_uid`` (new when
            that is None too).
        study_uid: StudyInstanceUID of the new study when there is no ``source`` (default
            derived from ``instance_uid``); ignored with a source.
        instance_number: Instance Number.
        manufacturer: Manufacturer of the SR and of the device observer.
        institution_name: Institution Name, if any.
        procedure_reported: the procedure the report is about (default SCT 363679005
            "Imaging procedure").
        content_qualification: ``RESEARCH`` (default: kgdx is not a cleared device),
            ``PRODUCT`` or ``SERVICE``.

    Raises:
        ValueError: a malformed payload (names the field and value), or a ``source`` that
            lacks a StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID or SOPClassUID.
    """
    findings = findings_of(payload)
    model = identity_of(payload, "model")
    ontology = identity_of(payload, "ontology")
    created = created_at_of(payload.get("created_at"))
    if instance_uid is None:
        instance_uid = str(generate_uid())
        series_uid = series_uid or str(generate_uid())
    series_uid = series_uid or derive_uid(instance_uid, "series")
    evidence = (
        _source_header(source)
        if source is not None
        else _anonymous_study(study_uid or derive_uid(instance_uid, "study"), created)
    )
    references = (
        [hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)]
        if source is not None
        else None
    )

    codes_used: list[ConceptCode] = []
    groups = []
    for i, f in enumerate(findings):
        code = resolve_code(
            concept_codes,
            f["concept"]["id"],
            f["concept"].get("label") or f.get("name"),
            ontology_version=ontology["version"] or None,
        )
        codes_used.append(code)
        concept = code.to_dicom()
        algorithm = hd.sr.AlgorithmIdentification(
            name=_lo(model["name"] or "kgdx"),
            version=_lo(model["version"] or "unknown"),
            parameters=[
                f"ontology={ontology['name']}@{ontology['version']}",
                f"threshold={f['threshold']:g}",
            ],
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(instance_uid, "finding", i, f["concept"]["id"]),
                identifier=_lo(f"{f['name']} ({f['concept']['id']})"),
            ),
            finding_type=concept,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=PROBABILITY, value=f["probability"], unit=NO_UNITS)
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=concept, value=PRESENT if f["positive"] else ABSENT
                )
            ],
            source_images=references,
        )
        for path in f["paths"]:
            group[0].ContentSequence.append(
                hd.sr.TextContentItem(
                    name=EXPLANATION_PATH,
                    value=path_text(path),
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", model["name"], model["version"]),
            name=_lo(model["name"] or "kgdx"),
            manufacturer_name=_lo(manufacturer),
            model_name=_lo(f"{model['name']} {model['version']}".strip()),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure_reported or IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=[evidence] if source is not None and _describable(evidence) else None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        institution_name=institution_name,
        series_description="kgdx AI findings",
        manufacturer_model_name=_lo(model["name"] or "kgdx"),
        software_versions=_lo(model["version"] or "unknown"),
        content_date=created.date(),
        content_time=created.time().replace(microsecond=0),
        series_date=created.date(),
        series_time=created.time().replace(microsecond=0),
        content_qualification=content_qualification,
        coding_schemes=_private_schemes(codes_used, ontology),
        # Labels and copied names may hold any character: write everything as UTF-8.
        specific_character_set="ISO_IR 192",
    )
    sr.TimezoneOffsetFromUTC = "+0000"
    if source is None:
        # The placeholder study has no instance to point at.
        for keyword in (
            "CurrentRequestedProcedureEvidenceSequence",
            "PertinentOtherEvidenceSequence",
        ):
            if keyword in sr:
                delattr(sr, keyword)
    return sr


def sr_bytes(sr: Dataset) -> bytes:
    """``sr`` as a DICOM Part 10 file (preamble, ``DICM``, file meta), for ``application/dicom``."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def path_text(path: Mapping[str, Any]) -> str:
    """One explanation path as text: ``Consolidation -suggests-> Pneumonia (score 0.50)``.

    Backward edges read ``Pneumonia <-is_a- Bacterial pneumonia``; nodes show their labels
    (their ids when unlabelled).
    """
    nodes = list(path.get("nodes") or [])
    edges = list(path.get("edges") or [])
    if not nodes:
        raise ValueError("an explanation path needs at least one node")
    parts = [_node_label(nodes[0])]
    for edge, node in zip(edges, nodes[1:], strict=False):
        rel = str(edge.get("relation", "related_to"))
        parts.append(f"<-{rel}-" if edge.get("direction") == "backward" else f"-{rel}->")
        parts.append(_node_label(node))
    text = " ".join(parts)
    score = path.get("score")
    if isinstance(score, int | float) and math.isfinite(score):
        text += f" (score {score:.2f})"
    return text


def is_present_code(code: Any) -> bool | None:
    """True for Present, False for Absent (either SNOMED code), None for anything else."""
    value, scheme = str(getattr(code, "value", "")), str(getattr(code, "scheme_designator", ""))
    if (value, scheme) == (PRESENT.value, PRESENT.scheme_designator):
        return True
    if (value, scheme) in ((ABSENT.value, ABSENT.scheme_designator), _ABSENT_OLD):
        return False
    return None


# -- payload checks ------------------------------------------------------------------------


def findings_of(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The payload's findings, checked and normalised (shared with :mod:`service.fhir`).

    Each has ``name``, ``concept {id, label}``, ``probability`` and ``threshold`` (floats
    in [0, 1]), ``positive`` (bool; ``probability >= threshold`` when absent) and ``paths``.

    Raises:
        ValueError: naming the first malformed field and its value.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a mapping, got {type(payload).__name__}")
    raw = payload.get("findings")
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or not raw:
        raise ValueError(f"payload.findings must be a non-empty list, got {raw!r:.80}")
    out = []
    for i, f in enumerate(raw):
        where = f"payload.findings[{i}]"
        if not isinstance(f, Mapping):
            raise ValueError(f"{where} must be an object, got {type(f).__name__}")
        concept = f.get("concept")
        if (
            not isinstance(concept, Mapping)
            or not isinstance(concept.get("id"), str)
            or not (concept["id"].strip())
        ):
            raise ValueError(f"{where}.concept.id must be a non-empty string, got {concept!r:.80}")
        p = f.get("probability")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{where}.probability must be a number in [0, 1], got {p!r}")
        t = f.get("threshold", 0.5)
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{where}.threshold must be a number in [0, 1], got {t!r}")
        positive = f.get("positive", p >= t)
        if not isinstance(positive, bool):
            raise ValueError(f"{where}.positive must be a boolean, got {positive!r}")
        paths = f.get("paths") or []
        if not isinstance(paths, Sequence) or not all(isinstance(x, Mapping) for x in paths):
            raise ValueError(f"{where}.paths must be a list of objects")
        name = f.get("name") or concept.get("label") or concept["id"]
        out.append(
            {
                "name": str(name),
                "concept": {"id": concept["id"].strip(), "label": concept.get("label") or ""},
                "probability": float(p),
                "threshold": float(t),
                "positive": positive,
                "paths": list(paths),
            }
        )
    return out


def identity_of(payload: Mapping[str, Any], key: str) -> dict[str, str]:
    """``payload[key]`` (``model`` or ``ontology``) as ``{name, version}`` strings."""
    value = payload.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"payload.{key} must be an object with name and version, got {value!r:.80}"
        )
    return {"name": str(value.get("name") or ""), "version": str(value.get("version") or "")}


def created_at_of(value: object) -> datetime:
    """The result's ``created_at`` (ISO 8601) in UTC; now when it has none."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"payload.created_at must be ISO 8601, got {value!r:.40}") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    return datetime.now(UTC)


# -- datasets ------------------------------------------------------------------------------


def _source_header(source: Dataset) -> Dataset:
    """The source's attributes without pixel data, with the Type 2 ones highdicom reads."""
    if not isinstance(source, Dataset):
        raise ValueError(f"source must be a pydicom Dataset or None, got {type(source).__name__}")
    missing = [k for k in _REQUIRED if not str(source.get(k, "") or "").strip()]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}; it must be a DICOM image")
    header = Dataset()
    for elem in source:
        if elem.tag.group < 0x7FE0:  # Pixel Data and friends are never needed
            header.add(copy.deepcopy(elem))
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _describable(header: Dataset) -> bool:
    """Whether highdicom can write the image's Image Library entry (TID 1600).

    Its descriptors need attributes that real DX / CR files often lack (Patient Orientation,
    Imager Pixel Spacing); without them the SR still references the image from every
    measurement group, just without a library entry.
    """
    try:
        hd.sr.ImageLibraryEntryDescriptors(header)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return False
    return True


def _anonymous_study(study_uid: str, created: datetime) -> Dataset:
    """Patient and study attributes of a new study for a result without a DICOM source."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = derive_uid(study_uid, "placeholder-series")
    ds.SOPInstanceUID = derive_uid(study_uid, "placeholder-instance")
    ds.SOPClassUID = SecondaryCaptureImageStorage
    for keyword in _TYPE2:
        setattr(ds, keyword, None)
    ds.StudyDate = created.strftime("%Y%m%d")
    ds.StudyTime = created.strftime("%H%M%S")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "kgdx: the input was not DICOM; no patient data"
    return ds


def _private_schemes(
    used: Sequence[ConceptCode], ontology: Mapping[str, str]
) -> list[hd.coding_schemes.CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for every private scheme the SR uses."""
    designators = {PRIVATE_SCHEME} | {c.scheme for c in used if c.private}
    items = []
    for designator in sorted(designators):
        if designator == PRIVATE_SCHEME:
            name = "kgdx report codes and KGDX ontology ids"
        else:
            name = f"Concept ids of ontology {ontology['name'] or 'unknown'} ({designator[2:]})"
        items.append(
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=designator,
                name=_lo(name),
                version=ontology["version"][:16] or None,
                responsible_organization="kgdx",
            )
        )
    return items


def _node_label(node: object) -> str:
    if isinstance(node, Mapping):
        return str(node.get("label") or node.get("id") or "?")
    return str(node)


def _lo(text: str) -> str:
    """A value for an LO attribute: one line, no backslash, at most 64 characters."""
    text = " ".join(str(text).split()).replace("\\", "/")
    return text if len(text) <= 64 else text[:61] + "..."
