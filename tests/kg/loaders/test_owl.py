"""The OWL RDF/XML loader: class mapping, restrictions, and refusal of hostile XML."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from kg.errors import OntologyFormatError
from kg.loaders import load_ontology
from kg.ontology import Concept

Write = Callable[[str, "str | bytes"], Path]

RDF_OPEN = (
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
    'xmlns:rdfs="http://www.w3.org/2000/01/rdf-schema#" '
    'xmlns:owl="http://www.w3.org/2002/07/owl#">'
)

BILLION_LAUGHS = (
    """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
"""
    + RDF_OPEN
    + """
  <owl:Class rdf:about="http://purl.obolibrary.org/obo/X_1"><rdfs:label>&lol9;</rdfs:label></owl:Class>
</rdf:RDF>
"""
)

EXTERNAL_ENTITY = (
    """<?xml version="1.0"?>
<!DOCTYPE rdf:RDF [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
"""
    + RDF_OPEN
    + """
  <owl:Class rdf:about="http://purl.obolibrary.org/obo/X_1"><rdfs:label>&xxe;</rdfs:label></owl:Class>
</rdf:RDF>
"""
)

PARAMETER_ENTITY = (
    """<?xml version="1.0"?>
<!DOCTYPE rdf:RDF [ <!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote; ]>
"""
    + RDF_OPEN
    + "</rdf:RDF>\n"
)

NAMESPACE_ENTITIES = (
    """<?xml version="1.0"?>
<!DOCTYPE rdf:RDF [ <!ENTITY owl "http://www.w3.org/2002/07/owl#" > ]>
"""
    + RDF_OPEN
    + "</rdf:RDF>\n"
)


def test_chest_owl_matches_chest_obo(fixtures: Path) -> None:
    owl = load_ontology(fixtures / "chest.owl")
    obo = load_ontology(fixtures / "chest.obo")
    assert owl.name == "chest"
    assert owl.meta["format"] == "owl" and owl.meta["source"] == "chest.owl"
    assert owl.meta["data-version"].endswith("/releases/2025-01-01/chest.owl")
    # Same concepts, field by field: labels (English chosen), synonyms of all scopes,
    # definitions, xrefs, deprecation and replaced_by.
    assert owl.concepts == obo.concepts
    # Same relations; OWL has no weights or sources.
    assert sorted((r.subject, r.predicate, r.object) for r in owl.relations) == sorted(
        (r.subject, r.predicate, r.object) for r in obo.relations
    )


def test_restriction_property_names(fixtures: Path) -> None:
    owl = load_ontology(fixtures / "chest.owl")
    by_subject = {(r.subject, r.object): r.predicate for r in owl.relations}
    assert by_subject[("CX:0000008", "CX:0000007")] == "part_of"  # BFO_0000050, fixed name
    assert by_subject[("CX:0000003", "CX:0000005")] == "suggests"  # label, declared later
    assert by_subject[("CX:0000003", "CX:0000007")] == "located_in"  # RO_0001025, known
    assert by_subject[("CX:0000004", "CX:0000003")] == "co_occurs_with"  # IRI local name


def test_non_obo_iris_are_kept_whole(write: Write) -> None:
    path = write(
        "x.owl",
        RDF_OPEN
        + '<owl:Class rdf:about="https://example.org/onto/Lung"><rdfs:label>Lung</rdfs:label>'
        "</owl:Class>"
        '<owl:Class rdf:about="https://example.org/onto/LeftLung">'
        '<rdfs:subClassOf rdf:resource="https://example.org/onto/Lung"/>'
        "<rdfs:subClassOf><owl:Restriction>"
        '<owl:onProperty rdf:resource="https://example.org/onto/partOf"/>'
        '<owl:someValuesFrom rdf:resource="https://example.org/onto/Lung"/>'
        "</owl:Restriction></rdfs:subClassOf></owl:Class></rdf:RDF>",
    )
    onto = load_ontology(path)
    assert onto.concepts["https://example.org/onto/Lung"] == Concept(
        "https://example.org/onto/Lung", "Lung"
    )
    assert {r.predicate for r in onto.relations} == {"is_a", "partOf"}


@pytest.mark.parametrize(
    "document",
    [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY, NAMESPACE_ENTITIES],
    ids=["billion-laughs", "external-entity", "parameter-entity", "entity-declarations"],
)
def test_dtds_and_entities_are_refused_fast(write: Write, document: str) -> None:
    path = write("evil.owl", document)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(OntologyFormatError, match="DTD or entities") as err:
            load_ontology(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5.0  # refused before expanding anything, even on a busy machine
    assert peak < 5_000_000
    assert err.value.line == 2
    assert "root:" not in str(err.value)  # nothing of /etc/passwd


@pytest.mark.parametrize(
    ("content", "message", "line"),
    [
        ("", "empty file", None),
        (b"<?xml version='1.0'?>\x00\x00", "NUL byte", 1),
        (RDF_OPEN + "\n<owl:Class>\n</rdf:RDF>\n", "malformed XML: mismatched tag", 3),
        (RDF_OPEN + "\n<owl:Class rdf:about='x'>", "malformed XML: no element found", 2),
        ("not xml at all\n", "malformed XML", 1),
        (
            '<Ontology xmlns="http://www.w3.org/2002/07/owl#"></Ontology>',
            "not OWL in RDF/XML",
            1,
        ),
        (
            b"<?xml version='1.0' encoding='utf-8'?>\n"
            + RDF_OPEN.encode()
            + b"\n<rdfs:label>caf\xe9</rdfs:label></rdf:RDF>",
            "malformed XML",
            3,
        ),
    ],
    ids=["empty", "binary", "mismatched", "truncated", "text", "owl-xml", "non-utf8"],
)
def test_bad_owl_files(write: Write, content: str | bytes, message: str, line: int | None) -> None:
    with pytest.raises(OntologyFormatError) as err:
        load_ontology(write("bad.owl", content))
    assert message in str(err.value)
    assert err.value.line == line


def test_progress_reports_bytes(fixtures: Path) -> None:
    calls: list[tuple[int, int]] = []
    load_ontology(fixtures / "chest.owl", progress=lambda d, t: calls.append((d, t)))
    total = (fixtures / "chest.owl").stat().st_size
    assert calls and calls[-1] == (total, total)
