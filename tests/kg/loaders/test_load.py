"""``load_ontology`` and ``detect_format``: dispatch, sniffing, and errors users cause."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from kg.errors import (
    CycleError,
    DanglingReferenceError,
    KgError,
    OntologyFormatError,
)
from kg.loaders import FORMATS, detect_format, load_ontology

Write = Callable[[str, "str | bytes"], Path]
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hp.obo", "obo"),
        ("HP.OBO", "obo"),
        ("hp.owl", "owl"),
        ("hp.rdf", "owl"),
        ("hp.xml", "owl"),
        ("hp.json", "obojson"),
        ("edges.csv", "csv"),
        ("edges.tsv", "csv"),
    ],
)
def test_detect_format_by_extension(name: str, expected: str) -> None:
    assert detect_format(Path(name)) == expected
    assert expected in FORMATS


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("format-version: 1.2\n[Term]\nid: X:1\n", "obo"),
        ("! comment\n\n[Term]\nid: X:1\n", "obo"),
        ('<?xml version="1.0"?>\n<rdf:RDF/>', "owl"),
        ('\ufeff  {"graphs": []}', "obojson"),
        ("subject\tpredicate\tobject\nA\tis_a\tB\n", "csv"),
    ],
)
def test_detect_format_by_sniffing(write: Write, content: str, expected: str) -> None:
    assert detect_format(write("ontology", content)) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("just some words\n", "unknown ontology format"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "binary data"),
        ("", "empty file"),
    ],
)
def test_detect_format_refuses(write: Write, content: str | bytes, message: str) -> None:
    with pytest.raises(OntologyFormatError, match=message):
        detect_format(write("mystery.dat", content))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(OntologyFormatError, match="no such file") as err:
        load_ontology(tmp_path / "nope.obo")
    assert isinstance(err.value, KgError) and err.value.path == str(tmp_path / "nope.obo")
    with pytest.raises(OntologyFormatError, match="not a regular file"):
        load_ontology(tmp_path)


def test_unknown_format_argument(fixtures: Path) -> None:
    with pytest.raises(OntologyFormatError, match="unknown format 'ttl'; expected one of obo"):
        load_ontology(fixtures / "chest.obo", format="ttl")


def test_format_argument_overrides_extension(fixtures: Path, write: Write) -> None:
    path = write("chest.txt", (fixtures / "chest.obo").read_text())
    assert len(load_ontology(path, format="obo")) == 10
    assert len(load_ontology(write("g.dat", '{"graphs": []}'), format="json")) == 0


def test_wrong_format_for_content_is_a_format_error(fixtures: Path, write: Write) -> None:
    path = write("chest.json", (fixtures / "chest.obo").read_text())
    with pytest.raises(OntologyFormatError, match="invalid JSON"):
        load_ontology(path)


CYCLE = """
[Term]
id: X:1
is_a: X:3

[Term]
id: X:2
is_a: X:1

[Term]
id: X:3
is_a: X:2
"""


def test_cycles_are_listed_in_order_or_allowed(write: Write) -> None:
    path = write("cycle.obo", CYCLE)
    with pytest.raises(CycleError) as err:
        load_ontology(path)
    assert err.value.cycle == ["X:1", "X:3", "X:2"]
    assert "X:1 -> X:3 -> X:2 -> X:1" in str(err.value)
    onto = load_ontology(path, allow_cycles=True)
    assert len(onto.relations) == 3 and onto.meta["is_a_cycle_concepts"] == "3"


def test_dangling_references_fail_or_drop(write: Write) -> None:
    path = write("dangling.obo", "[Term]\nid: X:1\nis_a: X:404\nrelationship: part_of X:1\n")
    with pytest.raises(DanglingReferenceError, match="X:1 is_a X:404"):
        load_ontology(path)
    onto = load_ontology(path, drop_dangling=True)
    assert [r.predicate for r in onto.relations] == ["part_of"]
    assert onto.meta["dropped_dangling"] == "1"


@pytest.mark.slow
def test_generated_300k_concepts_1m_edges_fast_and_small(tmp_path: Path) -> None:
    """The scale target: 300k concepts, 1M edges parse and validate well within 30 s,
    with peak RSS well under 2 GB (measured in a child process, so it is its own).

    Time is CPU time, so a busy machine does not fail the test; about 7 s on one core.
    """
    script = textwrap.dedent(
        f"""
        import resource, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bench.generate_ontology import generate_obo
        from kg.loaders import load_ontology
        path = generate_obo({str(tmp_path / "big.obo")!r}, 300_000, 1_000_000, seed=0)
        start = time.process_time()
        onto = load_ontology(path)
        elapsed = time.process_time() - start
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(len(onto.concepts), len(onto.relations), elapsed, rss_mb)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    concepts, relations, elapsed, rss_mb = out.stdout.split()
    assert (int(concepts), int(relations)) == (300_000, 1_000_000)
    assert float(elapsed) < 20, f"load took {float(elapsed):.1f} s"
    assert float(rss_mb) < 1024, f"peak RSS {float(rss_mb):.0f} MB"


def test_generator_is_deterministic_and_valid(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.generate_ontology import generate_obo

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = generate_obo(tmp_path / "a" / "gen.obo", 200, 700, seed=3)
    b = generate_obo(tmp_path / "b" / "gen.obo", 200, 700, seed=3)
    assert a.read_bytes() == b.read_bytes()
    onto = load_ontology(a)
    assert (len(onto.concepts), len(onto.relations)) == (200, 700)
    assert any(r.weight is not None for r in onto.relations)
