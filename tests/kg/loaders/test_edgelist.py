"""The CSV/TSV edge-list loader: delimiters, the sibling concepts table, column errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kg.errors import DuplicateIdError, OntologyFormatError
from kg.loaders import load_ontology
from kg.loaders.edgelist import join_list, split_list
from kg.ontology import Concept, Relation

Write = Callable[[str, "str | bytes"], Path]


def test_chest_edges_with_concepts_table(fixtures: Path) -> None:
    onto = load_ontology(fixtures / "chest_edges.csv")
    obo = load_ontology(fixtures / "chest.obo")
    assert onto.name == "chest_edges"
    assert onto.meta == {
        "format": "csv",
        "source": "chest_edges.csv",
        "concepts-source": "chest_edges.concepts.csv",
    }
    assert onto.concepts == obo.concepts  # quoted cells, | lists, obsolete, replaced_by
    assert Relation("CX:0000003", "suggests", "CX:0000005", 0.31, "NIH") in onto.relations
    assert Relation("CX:0000008", "part_of", "CX:0000007") in onto.relations  # IRI -> CURIE
    assert onto.content_hash() == obo.content_hash()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("edges.tsv", "subject\tpredicate\tobject\nA\tis_a\tB\nC\tpart_of\tB\n"),
        ("edges.csv", "Subject, Predicate ,OBJECT\nA,is_a,B\n\nC,part_of,B\n"),
        ("edges.txt", "subject;predicate;object\nA;is_a;B\nC;part_of;B\n"),
        ("edges.txt", "subject\tpredicate\tobject\r\nA\tis_a\tB\r\nC\tpart_of\tB\r\n"),
    ],
    ids=["tsv", "csv-loose-header", "sniffed-semicolon", "sniffed-tab-crlf"],
)
def test_without_concepts_table_ids_become_concepts(write: Write, name: str, text: str) -> None:
    onto = load_ontology(write(name, text), format="csv")
    assert onto.concepts == {c: Concept(c, c) for c in ("A", "B", "C")}
    assert onto.relations == [Relation("A", "is_a", "B"), Relation("C", "part_of", "B")]


def test_tsv_concepts_table_beside_edges(write: Write) -> None:
    write("g.concepts.tsv", "id\tlabel\tsynonyms\nA\tAlpha\ta|b\nB\tBeta\t\n")
    edges = "subject\tpredicate\tobject\tweight\nA\tsuggests\tB\t0.5\n"
    onto = load_ontology(write("g.tsv", edges))
    assert onto.concepts["A"] == Concept("A", "Alpha", ("a", "b"))
    assert onto.relations == [Relation("A", "suggests", "B", 0.5)]


def test_missing_columns_named_with_columns_found(write: Write) -> None:
    with pytest.raises(OntologyFormatError) as err:
        load_ontology(write("e.csv", "source,target,weight\nA,B,0.5\n"))
    msg = str(err.value)
    assert "missing column(s) subject, predicate, object" in msg
    assert "found columns: source, target, weight" in msg
    assert err.value.line == 1


def test_concepts_table_missing_columns(write: Write) -> None:
    write("e.concepts.csv", "identifier,name\nA,a\n")
    with pytest.raises(OntologyFormatError, match=r"missing column\(s\) id, label; found columns"):
        load_ontology(write("e.csv", "subject,predicate,object\nA,is_a,A\n"))


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("subject,predicate,object,weight\nA,is_a,B,\nB,suggests,A,1.2\n", "in (0, 1]", 3),
        ("subject,predicate,object,weight\nA,is_a,B,0\n", "in (0, 1]", 2),
        ("subject,predicate,object,weight\nA,is_a,B,often\n", "must be a number", 2),
        ("subject,predicate,object\nA,,B\n", "must not be empty", 2),
        ("subject,predicate,object\nA,is_a\n", "must not be empty", 2),
    ],
)
def test_bad_rows_report_line(write: Write, text: str, message: str, line: int) -> None:
    with pytest.raises(OntologyFormatError) as err:
        load_ontology(write("e.csv", text))
    assert message in str(err.value)
    assert err.value.line == line


def test_duplicate_concept_ids(write: Write) -> None:
    write("d.concepts.csv", "id,label\nA,a\nB,b\nA,again\n")
    with pytest.raises(DuplicateIdError, match=r"line 4 \(first at line 2\)"):
        load_ontology(write("d.csv", "subject,predicate,object\nA,is_a,B\n"))


def test_dangling_edge_with_concepts_table(write: Write) -> None:
    write("g.concepts.csv", "id,label\nA,a\n")
    path = write("g.csv", "subject,predicate,object\nA,is_a,Z\n")
    onto = load_ontology(path, drop_dangling=True)
    assert onto.relations == [] and onto.meta["dropped_dangling"] == "1"


@pytest.mark.parametrize(
    "items",
    [[], ["a"], ["a", "b c"], ["x|y", "back\\slash", "end\\"], ["\\|", "|"]],
)
def test_list_cells_round_trip(items: list[str]) -> None:
    assert split_list(join_list(items)) == items


def test_header_only_and_empty(write: Write) -> None:
    onto = load_ontology(write("h.csv", "subject,predicate,object\n"))
    assert len(onto) == 0 and onto.relations == []
    with pytest.raises(OntologyFormatError, match="empty file"):
        load_ontology(write("z.csv", ""))
