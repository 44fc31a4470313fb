"""NIH ChestX-ray14 co-occurrence statistics and their ``co_occurs_with`` lines."""

from __future__ import annotations

import gzip
import random
import shutil
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest

from kg.cooccurrence import (
    DEFAULT_DATA,
    NIH_FINDINGS,
    NIH_SOURCE,
    CooccurrenceEdge,
    compute_cooccurrence,
    count_cooccurrence,
    main,
    read_finding_labels,
    rewrite_obo,
)
from kg.errors import KgError, OntologyFormatError
from kg.loaders import load_ontology
from kg.mapping import CHEST_CXR_OBO

# Ten images: A=Atelectasis, E=Effusion, I=Infiltration, H=Hernia.
ROWS = [
    "Atelectasis|Effusion",
    "Atelectasis|Effusion|Infiltration",
    "Atelectasis",
    "Atelectasis|Infiltration",
    "Effusion",
    "Effusion|Infiltration",
    "No Finding",
    "No Finding",
    "Hernia",
    "Atelectasis|Effusion|Effusion",  # a repeated label counts once
]


def write_csv(path: Path, rows: list[str], *, gz: bool = False) -> Path:
    lines = ["Image Index,Finding Labels,Patient ID"]
    lines += [f"{i:08d}_000.png,{r},{i}" for i, r in enumerate(rows)]
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        path = path.with_suffix(".csv.gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_counts_on_small_table(tmp_path: Path, gz: bool) -> None:
    table = compute_cooccurrence(write_csv(tmp_path / "labels.csv", ROWS, gz=gz))
    a, e, i, h = (
        NIH_FINDINGS.index(x) for x in ("Atelectasis", "Effusion", "Infiltration", "Hernia")
    )
    assert table.n_images == 10
    assert table.counts[a] == 5 and table.counts[e] == 5 and table.counts[i] == 3
    assert table.counts[h] == 1
    assert table.joint[a, e] == table.joint[e, a] == 3
    assert table.probability("Atelectasis", "Effusion") == pytest.approx(3 / 5)
    assert table.probability("Infiltration", "Atelectasis") == pytest.approx(2 / 3)
    assert table.probability("Hernia", "Atelectasis") == 0.0
    assert table.probability("Pneumonia", "Atelectasis") == 0.0  # never seen: no division by 0
    assert table.other_labels == {}


def test_conditional_matches_brute_force() -> None:
    rng = random.Random(0)
    findings = NIH_FINDINGS[:6]
    images = [rng.sample(findings, rng.randint(0, 3)) for _ in range(500)]
    table = count_cooccurrence(images, findings)
    p = table.conditional()
    for x, y in permutations(findings, 2):
        with_x = [img for img in images if x in img]
        expected = sum(y in img for img in with_x) / len(with_x) if with_x else 0.0
        assert p[findings.index(x), findings.index(y)] == pytest.approx(expected)
    assert np.allclose(np.diag(p), [1.0 if table.counts[k] else 0.0 for k in range(6)])


def test_unknown_labels_are_tallied() -> None:
    table = count_cooccurrence([["Effusion", "Pleural Other"], ["No Finding"], ["Pleural Other"]])
    assert table.other_labels == {"Pleural Other": 2}
    assert table.n_images == 3


@pytest.mark.parametrize(
    ("min_prob", "min_support", "expected"),
    [
        (0.0, 1, 6),  # every pair seen at least once among A, E, I
        (0.5, 1, 4),  # A->E 3/5, E->A 3/5, I->A 2/3, I->E 2/3
        (0.5, 3, 2),  # only A<->E have 3 images together
        (1.0, 1, 0),
    ],
)
def test_edges_thresholds(min_prob: float, min_support: int, expected: int) -> None:
    table = count_cooccurrence(r.split("|") for r in ROWS)
    edges = table.edges(min_prob, min_support)
    assert len(edges) == expected
    for e in edges:
        assert e.probability >= min_prob and e.support >= min_support
        assert 0.0 < e.probability <= 1.0 and e.subject != e.object


def test_edges_sorted_by_subject_then_probability() -> None:
    table = count_cooccurrence(r.split("|") for r in ROWS)
    edges = table.edges(0.0, 1)
    subjects = [NIH_FINDINGS.index(e.subject) for e in edges]
    assert subjects == sorted(subjects)
    first = [e.probability for e in edges if e.subject == "Atelectasis"]
    assert first == sorted(first, reverse=True)


@pytest.mark.parametrize(("min_prob", "min_support"), [(-0.1, 20), (1.5, 20), (0.05, 0)])
def test_edges_reject_bad_thresholds(min_prob: float, min_support: int) -> None:
    table = count_cooccurrence([["Effusion"]])
    with pytest.raises(ValueError, match="min_"):
        table.edges(min_prob, min_support)


def test_read_labels_errors(tmp_path: Path) -> None:
    with pytest.raises(KgError, match="not found"):
        list(read_finding_labels(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Labels\nx.png,Effusion\n")
    with pytest.raises(KgError, match="Finding Labels"):
        list(read_finding_labels(bad))


SMALL_OBO = """format-version: 1.4
ontology: tiny

[Term]
id: T:1
name: Atelectasis
relationship: co_occurs_with T:3 {weight="0.9", source="NIH ChestX-ray14", support="99"} ! stale
relationship: co_occurs_with T:3 {weight="0.5", source="other study"} ! kept

[Term]
id: T:2
name: Pleural effusion
is_a: T:3 ! Infiltrate

[Term]
id: T:3
name: Infiltrate
relationship: co_occurs_with T:1 {weight="0.2", source="NIH ChestX-ray14"} ! stale, no edge now

[Typedef]
id: co_occurs_with
name: co-occurs with
"""

IDS = {"Atelectasis": "T:1", "Effusion": "T:2", "Infiltration": "T:3"}
EDGES = [
    CooccurrenceEdge("Atelectasis", "Effusion", 0.6, 3),
    CooccurrenceEdge("Atelectasis", "Infiltration", 0.4, 2),
    CooccurrenceEdge("Effusion", "Atelectasis", 0.0004, 1),
]


def test_rewrite_obo_replaces_only_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "tiny.obo"
    path.write_text(SMALL_OBO)
    assert rewrite_obo(path, EDGES, IDS)
    text = path.read_text()
    assert "stale" not in text
    assert 'source="other study"} ! kept' in text
    assert (
        'relationship: co_occurs_with T:2 {weight="0.600", source="NIH ChestX-ray14", '
        'support="3"} ! Pleural effusion'
    ) in text
    assert 'relationship: co_occurs_with T:1 {weight="0.0004"' in text
    # The new lines close their stanza, before the blank line.
    stanza = text.split("id: T:2\n", 1)[1].split("\n\n", 1)[0]
    assert stanza.splitlines()[-1].startswith("relationship: co_occurs_with T:1")
    onto = load_ontology(path)
    nih = [r for r in onto.relations if r.source == NIH_SOURCE]
    assert [(r.subject, r.object, r.weight) for r in nih] == [
        ("T:1", "T:2", 0.6),
        ("T:1", "T:3", 0.4),
        ("T:2", "T:1", 0.0004),
    ]
    # Idempotent: the second run changes nothing, byte for byte.
    assert not rewrite_obo(path, EDGES, IDS)
    assert path.read_text() == text


def test_rewrite_obo_needs_every_stanza(tmp_path: Path) -> None:
    path = tmp_path / "tiny.obo"
    path.write_text(SMALL_OBO)
    with pytest.raises(OntologyFormatError, match="T:9"):
        rewrite_obo(path, EDGES, {**IDS, "Hernia": "T:9"})
    assert path.read_text() == SMALL_OBO


def test_main_writes_bundled_copy_idempotently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obo = tmp_path / "chest_cxr.obo"
    shutil.copy(CHEST_CXR_OBO, obo)
    data = write_csv(tmp_path / "labels.csv", ROWS * 30, gz=True)
    args = ["--data", str(data), "--min-prob", "0.5", "--write", str(obo)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "P(column | row) over 300 images" in out and "updated" in out
    onto = load_ontology(obo)
    edges = [r for r in onto.relations if r.predicate == "co_occurs_with"]
    assert len(edges) == 4
    assert all(r.weight is not None and r.weight >= 0.5 for r in edges)
    before = obo.read_bytes()
    assert main(args) == 0
    assert "unchanged" in capsys.readouterr().out
    assert obo.read_bytes() == before
    # Everything but the co_occurs_with lines is untouched.
    strip = [ln for ln in CHEST_CXR_OBO.read_text().splitlines() if "co_occurs_with KGDX" not in ln]
    assert [ln for ln in obo.read_text().splitlines() if "co_occurs_with KGDX" not in ln] == strip


def test_main_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "nope.csv.gz")]) == 1
    assert capsys.readouterr().err.startswith("Error: ")
    with pytest.raises(SystemExit) as exc:
        main(["--min-prob", "2"])
    assert exc.value.code == 2


def test_real_nih_statistics() -> None:
    if not DEFAULT_DATA.is_file():
        pytest.skip(f"shared NIH label table not found at {DEFAULT_DATA}")
    table = compute_cooccurrence(DEFAULT_DATA)
    assert table.n_images == 112_120
    assert table.other_labels == {}
    counts = dict(zip(NIH_FINDINGS, table.counts.tolist(), strict=True))
    assert counts["Atelectasis"] == 11_559 and counts["Effusion"] == 13_317
    assert counts["Hernia"] == 227
    # 3,275 of the 11,559 atelectasis images are also labelled effusion.
    assert table.joint[0, 2] == 3_275
    assert table.probability("Atelectasis", "Effusion") == pytest.approx(3_275 / 11_559)
    assert len(table.edges(0.05, 20)) == 87
