"""Dataset label -> concept id resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kg.errors import MappingError
from kg.mapping import load_mapping, map_labels, normalize, require_all
from kg.ontology import Concept, Ontology


@pytest.fixture
def onto() -> Ontology:
    o = Ontology("toy")
    for c in [
        Concept("T:1", "Pleural effusion", ("Effusion", "Opacity"), xrefs=("UMLS:C0032227",)),
        Concept("T:2", "Consolidation", ("Opacity", "Airspace disease"), xrefs=("HP:0032177",)),
        Concept("T:3", "Pneumonia", ("Lung infection",), xrefs=("UMLS:C0032285",)),
        Concept("T:4", "Pleural thickening", ("Pleural_Thickening",)),
        Concept("T:5", "Nodule", (), xrefs=("UMLS:C0034079",)),
        Concept("T:6", "Mass", ("Nodule",), xrefs=("UMLS:C0034079",)),
        # Obsolete: one replaced, one a dead end; neither may be returned.
        Concept("T:7", "Infiltration", ("Infiltrate",), obsolete=True, replaced_by=("T:2",)),
        Concept("T:8", "Hernia", (), xrefs=("UMLS:C0019270",), obsolete=True),
        Concept("T:9", "Edema", ("Effusion",)),
        Concept("HP:0002202", "Pleural effusion (HPO)", ()),
    ]:
        o.add(c)
    return o


@pytest.mark.parametrize(
    ("label", "expected", "how"),
    [
        ("T:3", "T:3", "id"),
        ("t:3", "T:3", "id"),  # prefix case does not matter
        ("Pneumonia", "T:3", "label"),
        ("PNEUMONIA", "T:3", "label"),
        ("pleural_effusion", "T:1", "label"),
        ("  Pleural   effusion ", "T:1", "label"),
        ("Pleural_Thickening", "T:4", "label"),  # label beats the identical synonym
        ("Lung_Infection", "T:3", "synonym"),
        ("Nodule", "T:5", "label"),  # label beats T:6's synonym
        ("UMLS:C0032285", "T:3", "xref"),
        ("umls:c0032285", "T:3", "xref"),
        ("HP:0032177", "T:2", "xref"),
        ("Infiltration", "T:2", "label"),  # obsolete T:7 followed to T:2
        ("Infiltrate", "T:2", "synonym"),
        ("T:7", "T:2", "id"),
        ("HP:0002202", "HP:0002202", "id"),
    ],
)
def test_resolves(onto: Ontology, label: str, expected: str, how: str) -> None:
    report = map_labels([label], onto)
    assert report.resolved == {label: expected}
    assert report.how == {label: how}
    assert report.ok


@pytest.mark.parametrize(
    ("label", "candidates"),
    [
        ("Opacity", ["T:1", "T:2"]),  # synonym of two concepts
        ("Effusion", ["T:1", "T:9"]),
        ("UMLS:C0034079", ["T:5", "T:6"]),  # xref carried by two concepts
    ],
)
def test_ambiguous(onto: Ontology, label: str, candidates: list[str]) -> None:
    report = map_labels([label], onto)
    assert report.ambiguous == {label: candidates}
    assert report.resolved == {} and report.unresolved == []
    assert not report.ok


@pytest.mark.parametrize("label", ["Hernia", "T:8", "UMLS:C0019270", "Fracture", "", "   ", "T:99"])
def test_unresolved(onto: Ontology, label: str) -> None:
    report = map_labels([label], onto)
    assert report.unresolved == [label]
    assert report.resolved == {}


def test_mapping_table_wins_and_is_normalized(onto: Ontology) -> None:
    table = {"Opacity": "T:2", "pleural effusion": "T:9"}
    report = map_labels(["opacity", "Pleural_Effusion", "Pneumonia"], onto, table)
    assert report.resolved == {"opacity": "T:2", "Pleural_Effusion": "T:9", "Pneumonia": "T:3"}
    assert report.how == {"opacity": "mapping", "Pleural_Effusion": "mapping", "Pneumonia": "label"}


def test_mapping_target_through_xref_replacement_or_missing(onto: Ontology) -> None:
    table = {"A": "HP:0032177", "B": "T:7", "C": "T:42", "D": "T:8"}
    report = map_labels(["A", "B", "C", "D"], onto, table)
    # A: the id of a concept merged away survives as an xref; B: obsolete -> replacement.
    assert report.resolved == {"A": "T:2", "B": "T:2"}
    assert report.how == {"A": "mapping", "B": "mapping"}
    # C, D: the table names nothing live; the label falls through and the report says why.
    assert report.unresolved == ["C", "D"]
    assert set(report.notes) == {"C", "D"}
    assert "T:42" in report.notes["C"]


def test_mapping_file(tmp_path: Path, onto: Ontology) -> None:
    path = tmp_path / "map.csv"
    path.write_text(
        "label,concept_id,comment\n# a comment row\nOpacity,T:1,why\n\nNo_Finding,T:5,\n",
        encoding="utf-8",
    )
    assert load_mapping(path) == {"Opacity": "T:1", "No_Finding": "T:5"}
    report = map_labels(["Opacity", "No Finding"], onto, path)
    assert report.resolved == {"Opacity": "T:1", "No Finding": "T:5"}
    assert map_labels(["Opacity"], onto, str(path)).resolved == {"Opacity": "T:1"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("name,id\nA,T:1\n", "header"),
        ("label,concept_id\nA,\n", "row 2"),
        ("label,concept_id\nNo Finding,T:1\nno_finding,T:2\n", "already maps"),
    ],
)
def test_mapping_file_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "map.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MappingError, match=match):
        load_mapping(path)


def test_missing_mapping_file(tmp_path: Path, onto: Ontology) -> None:
    with pytest.raises(MappingError, match="not found"):
        map_labels(["A"], onto, tmp_path / "nope.csv")


def test_duplicates_resolved_once_in_order(onto: Ontology) -> None:
    report = map_labels(["Fracture", "Pneumonia", "Fracture", "Xyz"], onto)
    assert report.unresolved == ["Fracture", "Xyz"]
    assert list(report.resolved) == ["Pneumonia"]


def test_labels_must_be_a_list(onto: Ontology) -> None:
    with pytest.raises(MappingError, match="list"):
        map_labels("Pneumonia", onto)


def test_to_dict_is_json(onto: Ontology) -> None:
    report = map_labels(["Pneumonia", "Opacity", "Xyz"], onto)
    d = json.loads(json.dumps(report.to_dict()))
    assert d == {
        "resolved": {"Pneumonia": "T:3"},
        "how": {"Pneumonia": "label"},
        "unresolved": ["Xyz"],
        "ambiguous": {"Opacity": ["T:1", "T:2"]},
        "notes": {},
    }


def test_require_all(onto: Ontology) -> None:
    good = map_labels(["Pneumonia", "Nodule"], onto)
    assert require_all(good) is good
    with pytest.raises(MappingError) as exc:
        require_all(map_labels(["Pneumonia", "Opacity", "Xyz"], onto))
    message = str(exc.value)
    assert "1 unresolved: Xyz" in message
    assert "Opacity -> T:1 | T:2" in message


@pytest.mark.parametrize(
    ("a", "b"),
    [("Pleural_Thickening", "pleural thickening"), ("No  Finding", "no_finding"), ("X\tY", "x y")],
)
def test_normalize(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)
