"""The OBO Graphs JSON loader: IRIs and CURIEs, properties, edge weights, JSON-path errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kg.errors import DuplicateIdError, OntologyFormatError
from kg.export import export_ontology
from kg.loaders import load_ontology
from kg.ontology import Relation

Write = Callable[[str, "str | bytes"], Path]


def test_chest_json_equals_chest_obo(fixtures: Path) -> None:
    onto = load_ontology(fixtures / "chest.json")
    obo = load_ontology(fixtures / "chest.obo")
    assert onto.meta["format"] == "obojson" and onto.meta["source"] == "chest.json"
    assert onto.meta["data-version"].endswith("/releases/2025-01-01/chest.json")
    assert onto.concepts == obo.concepts  # IRIs and CURIEs, PROPERTY/INDIVIDUAL skipped
    assert Relation("CX:0000003", "suggests", "CX:0000005", 0.31, "NIH") in onto.relations
    assert Relation("CX:0000008", "part_of", "CX:0000007") in onto.relations
    assert onto.content_hash() == obo.content_hash()


def test_exported_obojson_loads_back(fixtures: Path, tmp_path: Path) -> None:
    obo = load_ontology(fixtures / "chest.obo")
    out = tmp_path / "exported.json"
    export_ontology(obo, out, "obojson")
    again = load_ontology(out)
    assert again.content_hash() == obo.content_hash()
    assert again.meta["data-version"] == obo.meta["data-version"]


def test_a_bare_graph_object_is_accepted(write: Write) -> None:
    doc = {
        "nodes": [{"id": "X:1", "lbl": "one"}, {"id": "X:2"}],
        "edges": [{"sub": "X:2", "pred": "is_a", "obj": "X:1"}],
    }
    onto = load_ontology(write("bare.json", json.dumps(doc)))
    assert set(onto.concepts) == {"X:1", "X:2"}


def _graph(nodes: Any = None, edges: Any = None) -> dict[str, Any]:
    return {
        "graphs": [
            {
                "nodes": nodes if nodes is not None else [{"id": "X:1"}],
                "edges": edges if edges is not None else [],
            }
        ]
    }


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "$: expected an object, got an array"),
        ({"nodes_": []}, "no 'graphs' array"),
        ({"graphs": {}}, "graphs: expected an array, got an object"),
        (_graph(nodes=[{"id": "X:1"}, {"id": 7}]), "graphs[0].nodes[1].id: expected a string"),
        (_graph(nodes=[{"lbl": "no id"}]), "graphs[0].nodes[0].id: expected a string, got null"),
        (
            _graph(nodes=[{"id": "X:1", "meta": {"synonyms": [{"val": ["a"]}]}}]),
            "graphs[0].nodes[0].meta.synonyms[0].val: expected a string, got an array",
        ),
        (
            _graph(nodes=[{"id": "X:1", "meta": {"synonyms": "syn"}}]),
            "graphs[0].nodes[0].meta.synonyms: expected an array",
        ),
        (
            _graph(nodes=[{"id": "X:1", "meta": {"deprecated": "yes"}}]),
            "graphs[0].nodes[0].meta.deprecated: expected true/false",
        ),
        (
            _graph(edges=[{"sub": "X:1", "obj": "X:1"}]),
            "graphs[0].edges[0].pred: expected a string",
        ),
        (
            _graph(
                edges=[
                    {
                        "sub": "X:1",
                        "pred": "p",
                        "obj": "X:1",
                        "meta": {"basicPropertyValues": [{"pred": "weight", "val": "1.7"}]},
                    }
                ]
            ),
            "graphs[0].edges[0].meta.basicPropertyValues[0].val: weight must be in (0, 1]",
        ),
        (
            _graph(
                edges=[
                    {
                        "sub": "X:1",
                        "pred": "p",
                        "obj": "X:1",
                        "meta": {"basicPropertyValues": [{"pred": "weight", "val": "heavy"}]},
                    }
                ]
            ),
            "weight must be a number",
        ),
    ],
)
def test_shape_errors_name_the_json_path(write: Write, doc: Any, message: str) -> None:
    with pytest.raises(OntologyFormatError) as err:
        load_ontology(write("bad.json", json.dumps(doc)))
    assert message in str(err.value)


def test_invalid_json_reports_line(write: Write) -> None:
    with pytest.raises(OntologyFormatError) as err:
        load_ontology(write("bad.json", '{"graphs": [\n  {"nodes": [}\n]}'))
    assert err.value.line == 2 and "invalid JSON" in str(err.value)


def test_duplicate_node_ids(write: Write) -> None:
    doc = _graph(nodes=[{"id": "X:1"}, {"id": "http://purl.obolibrary.org/obo/X_1"}])
    with pytest.raises(DuplicateIdError, match=r"graphs\[0\]\.nodes\[1\] \(first at graphs\[0\]"):
        load_ontology(write("dup.json", json.dumps(doc)))


def test_size_limit(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kg.loaders.obojson.MAX_JSON_BYTES", 10)
    with pytest.raises(OntologyFormatError, match="over the 10-byte limit"):
        load_ontology(write("big.json", json.dumps(_graph())))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b'{"graphs": [\x00]}', "NUL byte"), (b'{"a": "\xff"}', "UTF-8")],
)
def test_empty_binary_non_utf8(write: Write, content: bytes, message: str) -> None:
    with pytest.raises(OntologyFormatError, match=message):
        load_ontology(write("x.json", content))
