"""Concept -> DICOM / FHIR codes: SNOMED CT first, then UMLS, then the ontology's own id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from kg.errors import NotFoundError
from kg.ontology import Concept, Ontology, Relation
from kg.store import GraphStore
from service.coding import (
    KGDX_SYSTEM_PREFIX,
    PRIVATE_SCHEME,
    SNOMED_SYSTEM,
    UMLS_SYSTEM,
    ConceptCode,
    ConceptCoder,
    code_for_concept,
    coder_for,
    private_scheme,
    resolve_code,
)


@pytest.mark.parametrize(
    ("xrefs", "scheme", "value", "system"),
    [
        (("SNOMEDCT_US:233604007", "UMLS:C0032285"), "SCT", "233604007", SNOMED_SYSTEM),
        (("UMLS:C0032285", "SNOMEDCT_US:233604007"), "SCT", "233604007", SNOMED_SYSTEM),
        (("SCTID:233604007",), "SCT", "233604007", SNOMED_SYSTEM),
        (("SNOMEDCT_US_2023_09_01:233604007",), "SCT", "233604007", SNOMED_SYSTEM),
        (("HP:0002090", "UMLS:C0032285"), "UMLS", "C0032285", UMLS_SYSTEM),
        (("umls:C0032285",), "UMLS", "C0032285", UMLS_SYSTEM),
        (("HP:0002090",), "99KGDX", "KGDX:0000042", KGDX_SYSTEM_PREFIX + "KGDX"),
        ((), "99KGDX", "KGDX:0000042", KGDX_SYSTEM_PREFIX + "KGDX"),
        # Malformed codes are skipped, not written into a report.
        (("SNOMEDCT_US:not-a-number", "UMLS:X123"), "99KGDX", "KGDX:0000042", None),
    ],
)
def test_best_code_snomed_then_umls_then_own_id(
    xrefs: tuple[str, ...], scheme: str, value: str, system: str | None
) -> None:
    concept = Concept("KGDX:0000042", "Pneumonia", xrefs=xrefs)
    code = code_for_concept(concept, ontology_version="0123456789abcdef")
    assert (code.scheme, code.value, code.meaning) == (scheme, value, "Pneumonia")
    assert code.concept_id == "KGDX:0000042"
    if system is not None:
        assert code.system == system
    # The own id is always among the codes, so FHIR keeps the ontology's identity.
    assert any(c["code"] == "KGDX:0000042" for c in code.fhir_codings())
    dicom = code.to_dicom()
    assert isinstance(dicom, hd.sr.CodedConcept)
    assert (dicom.value, dicom.scheme_designator) == (value, scheme)
    if code.private:
        assert dicom.scheme_version == "0123456789abcdef"
        assert code.to_fhir()["version"] == "0123456789abcdef"
    else:
        assert dicom.scheme_version is None and "version" not in code.to_fhir()


@pytest.mark.parametrize(
    ("concept_id", "designator"),
    [
        ("KGDX:0000042", "99KGDX"),
        ("HP:0002202", "99HP"),
        ("X:pneumonia", "99X"),
        ("no-prefix", PRIVATE_SCHEME),
        (":empty-prefix", PRIVATE_SCHEME),
        ("my-onto.v2:7", "99MYONTOV2"),
        ("AVERYLONGONTOLOGYPREFIX:1", "99AVERYLONGONTOL"),
    ],
)
def test_private_scheme_starts_with_99_and_fits_sh(concept_id: str, designator: str) -> None:
    got = private_scheme(concept_id)
    assert got == designator
    assert got.startswith("99") and len(got) <= 16 and got.isalnum()


def test_meaning_fits_lo_and_has_no_backslash() -> None:
    code = code_for_concept(None, "KGDX:1", "A\\B " + "very long label " * 10)
    assert len(code.meaning) == 64 and "\\" not in code.meaning
    code.to_dicom()  # highdicom refuses meanings over 64 characters


def test_long_code_values_use_long_code_value() -> None:
    code = code_for_concept(None, "KGDX:" + "9" * 20, "Long")
    assert "LongCodeValue" in code.to_dicom()


def test_concept_id_is_required() -> None:
    with pytest.raises(ValueError, match="concept_id"):
        code_for_concept(None, "  ", "x")


# -- lookups -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[GraphStore, str]]:
    onto = Ontology(name="mini")
    onto.add(Concept("KGDX:1", "Pneumonia", xrefs=("UMLS:C0032285", "SNOMEDCT_US:233604007")))
    onto.add(Concept("KGDX:2", "Pleural effusion", xrefs=("UMLS:C0032227",)))
    onto.add(Concept("KGDX:3", "Lung finding"))
    onto.relations = [Relation("KGDX:1", "is_a", "KGDX:3"), Relation("KGDX:2", "is_a", "KGDX:3")]
    with GraphStore(f"sqlite:///{tmp_path / 'kg.db'}") as s:
        info, _ = s.save(onto, activate=True)
        yield s, info.ref


def test_coder_reads_xrefs_from_the_store_once_per_concept(
    store: tuple[GraphStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, ref = store
    calls: list[str] = []
    original = s.concept

    def counting(cid: str, r: str | None = None) -> Concept:
        calls.append(cid)
        return original(cid, r)

    monkeypatch.setattr(s, "concept", counting)
    coder = ConceptCoder.from_store(s, ref)
    assert coder.ontology_version == ref.split("@")[1]
    got = [coder(cid, "label from the result") for cid in ("KGDX:1", "KGDX:2", "KGDX:3")] * 3
    assert [(c.scheme, c.value) for c in got[:3]] == [
        ("SCT", "233604007"),
        ("UMLS", "C0032227"),
        ("99KGDX", "KGDX:3"),
    ]
    # The ontology's label wins over the result's; the own-id code carries the version.
    assert got[0].meaning == "Pneumonia" and got[2].scheme_version == coder.ontology_version
    assert calls == ["KGDX:1", "KGDX:2", "KGDX:3"]


def test_unknown_concepts_and_versions_fall_back_to_own_ids(
    store: tuple[GraphStore, str],
) -> None:
    s, ref = store
    code = ConceptCoder.from_store(s, ref)("KGDX:999", "Something new")
    assert (code.scheme, code.value, code.meaning) == ("99KGDX", "KGDX:999", "Something new")
    other = ConceptCoder.from_store(s, "mini@ffffffffffffffff")("KGDX:1", "Pneumonia")
    assert other.scheme == "99KGDX"


def test_coder_for_uses_the_results_ontology_version_and_caches(
    store: tuple[GraphStore, str],
) -> None:
    s, ref = store
    name, version = ref.split("@")
    cache: dict[object, object] = {}
    payload = {"ontology": {"name": name, "version": version}}
    coder = coder_for(s, payload, cache=cache)
    assert coder is not None and coder("KGDX:1").scheme == "SCT"
    assert coder_for(s, payload, cache=cache) is coder
    assert coder_for(s, {}, default_ref=ref, cache=cache) is coder
    assert coder_for(None, payload) is None


# -- what the builders accept --------------------------------------------------------------


def test_resolve_code_accepts_mappings_callables_and_coded_concepts() -> None:
    sct = ConceptCode("233604007", "SCT", "Pneumonia", SNOMED_SYSTEM)
    assert resolve_code({"KGDX:1": sct}, "KGDX:1") is sct
    assert resolve_code({"KGDX:1": sct}, "KGDX:2", "Other").value == "KGDX:2"
    assert resolve_code(lambda cid: sct, "KGDX:1") is sct
    seen: list[tuple[str, str | None]] = []

    def two_args(cid: str, label: str | None) -> ConceptCode:
        seen.append((cid, label))
        return sct

    resolve_code(two_args, "KGDX:1", "Pneumonia")
    assert seen == [("KGDX:1", "Pneumonia")]

    def missing(cid: str) -> ConceptCode:
        raise NotFoundError(cid)

    assert resolve_code(missing, "KGDX:7", "Seven").scheme == "99KGDX"
    assert resolve_code(lambda cid: {}[cid], "KGDX:7", "Seven").scheme == "99KGDX"
    assert resolve_code(None, "KGDX:7", "Seven", ontology_version="v").scheme_version == "v"

    from_hd = resolve_code({"KGDX:1": hd.sr.CodedConcept("C0032285", "UMLS", "P")}, "KGDX:1")
    assert (from_hd.system, from_hd.value) == (UMLS_SYSTEM, "C0032285")
    from_pydicom = resolve_code({"KGDX:1": codes.SCT.Present}, "KGDX:1")
    assert from_pydicom.system == SNOMED_SYSTEM
    private = resolve_code({"KGDX:1": hd.sr.CodedConcept("KGDX:1", "99KGDX", "P")}, "KGDX:1")
    assert private.private and private.system == KGDX_SYSTEM_PREFIX + "KGDX"


@pytest.mark.parametrize("bad", [42, "not a lookup"])
def test_resolve_code_refuses_other_types(bad: object) -> None:
    with pytest.raises(TypeError, match="concept_codes"):
        resolve_code(bad, "KGDX:1")  # type: ignore[arg-type]


def test_resolve_code_refuses_values_that_are_not_codes() -> None:
    with pytest.raises(TypeError, match="KGDX:1"):
        resolve_code({"KGDX:1": "233604007"}, "KGDX:1")  # type: ignore[dict-item]
