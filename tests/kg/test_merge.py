"""Merging ontologies through shared ids and cross-references."""

from __future__ import annotations

import json
import random

import pytest

from kg.graph import ConceptGraph
from kg.loaders import load_ontology
from kg.mapping import CHEST_CXR_OBO, NIH_LABEL_MAP, map_labels
from kg.merge import MATCH_KINDS, merge
from kg.ontology import Concept, Ontology, Relation
from kg.validate import validate
from tests.kg.test_chest_graph import NIH_LABELS, hp_obo_path


def kgdx_like() -> Ontology:
    a = Ontology("kgdx-toy", meta={"data-version": "2025-01-01"})
    for c in [
        Concept("HP:1", "All"),
        Concept("K:1", "Lung opacity", xrefs=("HP:5",)),
        Concept("K:2", "Consolidation", ("Airspace consolidation",), xrefs=("HP:3",)),
        Concept("K:3", "Pneumonia", xrefs=("UMLS:C0032285",)),
        Concept("K:4", "Effusion"),
        Concept("K:5", "Nodule", xrefs=("UMLS:C9",)),
        Concept("K:6", "Mass", xrefs=("UMLS:C9",)),
        Concept("K:7", "Edema", xrefs=("UMLS:C7",)),
    ]:
        a.add(c)
    a.relations = [
        Relation("K:1", "is_a", "HP:1"),
        Relation("K:2", "is_a", "K:1"),
        Relation("K:2", "suggests", "K:3"),
        Relation("K:5", "co_occurs_with", "K:6", 0.2, "NIH ChestX-ray14"),
    ]
    return a


def hpo_like() -> Ontology:
    b = Ontology("hp-toy", meta={"data-version": "hp/releases/2025-01-16"})
    for c in [
        Concept("HP:1", "All", ("Root",), definition="Root of all terms."),
        Concept("HP:2", "Abnormal lung"),
        Concept("HP:3", "Parenchymal consolidation", ("Consolidation of lung",), "Airless lung."),
        Concept("HP:4", "Pleural effusion", xrefs=("K:4", "UMLS:C0032227")),
        Concept("HP:5", "Pulmonary opacity"),
        # Obsolete: shares a CUI with K:3 but must not match it; its replacement is remapped.
        Concept(
            "HP:6", "Old effusion", xrefs=("UMLS:C0032285",), obsolete=True, replaced_by=("HP:4",)
        ),
        Concept("HP:7", "Nodule or mass", xrefs=("UMLS:C9",)),  # ties K:5 and K:6
        Concept("HP:8", "Pulmonary edema", xrefs=("UMLS:C7",)),  # both claim K:7 ...
        Concept("HP:9", "Edema", xrefs=("UMLS:C7",)),  # ... HP:8 first by id
        Concept("HP:10", "Pneumonia", xrefs=("UMLS:C0032285", "SNOMEDCT_US:233604007")),
        Concept("HP:11", "Unrelated"),
    ]:
        b.add(c)
    b.relations = [
        Relation("HP:2", "is_a", "HP:1"),
        Relation("HP:5", "is_a", "HP:2"),
        Relation("HP:3", "is_a", "HP:5"),  # = K:2 is_a K:1: a duplicate once unified
        Relation("HP:4", "is_a", "HP:2"),
        Relation("HP:7", "is_a", "HP:5"),
        Relation("HP:8", "is_a", "HP:2"),
        Relation("HP:9", "is_a", "HP:1"),
        Relation("HP:10", "is_a", "HP:2"),
        Relation("HP:11", "is_a", "HP:1"),
        Relation("HP:10", "associated_with", "HP:4", 0.3, "some study"),
    ]
    return b


def test_unifies_by_id_and_xrefs() -> None:
    m, report = merge(kgdx_like(), hpo_like())
    pairs = {(x.b_id, x.a_id, x.via) for x in report.matched}
    assert pairs == {
        ("HP:1", "HP:1", "id"),
        ("HP:3", "K:2", "a_xref"),
        ("HP:5", "K:1", "a_xref"),
        ("HP:4", "K:4", "b_xref"),
        ("HP:10", "K:3", "shared_xref"),
        ("HP:7", "K:5", "shared_xref"),
        ("HP:8", "K:7", "shared_xref"),
    }
    assert report.counts() == {"id": 1, "a_xref": 2, "b_xref": 1, "shared_xref": 3}
    assert report.added == 4  # HP:2, HP:6, HP:9, HP:11
    assert set(m.concepts) == {*kgdx_like().concepts, "HP:2", "HP:6", "HP:9", "HP:11"}
    assert len(m) == 8 + 11 - 7


def test_unified_concept_keeps_a_and_gains_b() -> None:
    m, _ = merge(kgdx_like(), hpo_like())
    c = m.concepts["K:2"]
    assert c.label == "Consolidation"
    assert c.xrefs == ("HP:3",)
    assert c.synonyms == (
        "Airspace consolidation",
        "Parenchymal consolidation",
        "Consolidation of lung",
    )
    assert c.definition == "Airless lung."  # a had none
    effusion = m.concepts["K:4"]
    assert effusion.synonyms == ("Pleural effusion",)
    assert effusion.xrefs == ("HP:4", "UMLS:C0032227")  # K:4 itself is not its own xref
    assert m.concepts["HP:1"].synonyms == ("Root",)
    assert m.concepts["HP:6"].replaced_by == ("K:4",)


def test_hierarchy_of_b_is_reachable() -> None:
    m, _ = merge(kgdx_like(), hpo_like())
    graph = ConceptGraph.from_ontology(m)
    assert set(graph.ancestors("K:2")) == {"K:1", "HP:1", "HP:2"}
    assert set(graph.ancestors("K:3")) == {"HP:1", "HP:2"}


def test_relations_carry_provenance_and_drop_duplicates() -> None:
    m, report = merge(kgdx_like(), hpo_like())
    by_key = {(r.subject, r.predicate, r.object): r for r in m.relations}
    assert len(by_key) == len(m.relations)
    assert by_key[("K:2", "is_a", "K:1")].source == "kgdx-toy"
    assert by_key[("K:5", "co_occurs_with", "K:6")].source == "NIH ChestX-ray14"
    assert by_key[("K:1", "is_a", "HP:2")].source == "hp-toy"  # HP:5 is_a HP:2, rewritten
    assert by_key[("K:3", "associated_with", "K:4")] == Relation(
        "K:3", "associated_with", "K:4", 0.3, "some study"
    )
    assert all(r.source for r in m.relations)
    assert report.duplicates_dropped == 1
    assert report.relations_a == 4 and report.relations_b == 9
    validate(m)  # no dangling ids, no cycle


def test_conflicts_are_reported_and_deterministic() -> None:
    _, report = merge(kgdx_like(), hpo_like())
    assert report.conflicts == [
        {"b_id": "HP:7", "candidates": ["K:5", "K:6"], "chosen": "K:5", "via": "shared_xref"},
        {"b_id": "HP:9", "candidates": ["K:7"], "chosen": None, "taken_by": "HP:8"},
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_result_does_not_depend_on_input_order(seed: int) -> None:
    reference, ref_report = merge(kgdx_like(), hpo_like())
    rng = random.Random(seed)
    a, b = kgdx_like(), hpo_like()
    for o in (a, b):
        items = list(o.concepts.items())
        rng.shuffle(items)
        o.concepts = dict(items)
        rng.shuffle(o.relations)
    m, report = merge(a, b)
    assert m.content_hash() == reference.content_hash()
    assert report.conflicts == ref_report.conflicts
    assert sorted(report.matched, key=str) == sorted(ref_report.matched, key=str)


def test_inputs_are_not_modified() -> None:
    a, b = kgdx_like(), hpo_like()
    ha, hb = a.content_hash(), b.content_hash()
    merge(a, b)
    assert (a.content_hash(), b.content_hash()) == (ha, hb)


def test_meta_records_both_sources() -> None:
    a, b = kgdx_like(), hpo_like()
    m, _ = merge(a, b)
    assert m.name == "kgdx-toy+hp-toy"
    assert json.loads(m.meta["merged_from"]) == [
        {"name": "kgdx-toy", "version": a.content_hash(), "data-version": "2025-01-01"},
        {"name": "hp-toy", "version": b.content_hash(), "data-version": "hp/releases/2025-01-16"},
    ]
    assert merge(a, b, name="joined")[0].name == "joined"


def test_by_id_ignores_xrefs() -> None:
    m, report = merge(kgdx_like(), hpo_like(), by="id")
    assert [(x.b_id, x.via) for x in report.matched] == [("HP:1", "id")]
    assert report.added == 10 and report.conflicts == []
    assert "HP:3" in m.concepts and m.concepts["K:2"].xrefs == ("HP:3",)


def test_xref_prefixes_limit_shared_xrefs() -> None:
    _, report = merge(kgdx_like(), hpo_like(), xref_prefixes=["SNOMEDCT_US"])
    assert report.counts()["shared_xref"] == 0
    assert report.counts()["a_xref"] == 2 and report.counts()["b_xref"] == 1


def test_cycle_created_by_merge_is_reported() -> None:
    a = Ontology("a", {"A:1": Concept("A:1", "x", xrefs=("B:1",)), "A:2": Concept("A:2", "y")})
    a.relations = [Relation("A:1", "is_a", "A:2")]
    b = Ontology("b", {"B:1": Concept("B:1", "x"), "B:2": Concept("B:2", "y", xrefs=("A:2",))})
    b.relations = [Relation("B:2", "is_a", "B:1")]
    _, report = merge(a, b)
    assert sorted(report.cycle) == ["A:1", "A:2"]


@pytest.mark.parametrize("by", ["label", ""])
def test_rejects_unknown_match_mode(by: str) -> None:
    with pytest.raises(ValueError, match="by must be"):
        merge(kgdx_like(), hpo_like(), by=by)  # type: ignore[arg-type]


def test_report_to_dict_is_json() -> None:
    _, report = merge(kgdx_like(), hpo_like())
    d = json.loads(json.dumps(report.to_dict()))
    assert d["match_counts"] == dict(zip(MATCH_KINDS, [1, 2, 1, 3], strict=True))
    assert {"b_id": "HP:3", "a_id": "K:2", "via": "a_xref", "xref": ""} in d["matched"]
    assert {"b_id": "HP:10", "a_id": "K:3", "via": "shared_xref", "xref": "UMLS:C0032285"} in (
        d["matched"]
    )


# ---------------------------------------------------------------- the real graphs


@pytest.fixture(scope="module")
def chest() -> Ontology:
    return load_ontology(CHEST_CXR_OBO)


@pytest.fixture(scope="module")
def hpo() -> Ontology:
    return load_ontology(hp_obo_path())


def test_bundled_graph_with_hpo(chest: Ontology, hpo: Ontology) -> None:
    m, report = merge(chest, hpo)
    consolidation = map_labels(["Consolidation"], chest, NIH_LABEL_MAP).resolved["Consolidation"]
    # KGDX Consolidation and HP:0032177 are one node, with HPO's hierarchy above it.
    assert "HP:0032177" not in m.concepts
    node = m.concepts[consolidation]
    assert "HP:0032177" in node.xrefs and "Parenchymal consolidation" in node.synonyms
    up = ConceptGraph.from_ontology(m).ancestors(consolidation)
    assert {"HP:0012252", "HP:0000118", "HP:0000001"} <= set(up)
    assert map_labels(["HP:0032177"], m).resolved == {"HP:0032177": consolidation}
    # Every HP id the bundled graph cites was unified, and nothing was folded twice.
    cited = {x for c in chest.concepts.values() for x in c.xrefs if x.startswith("HP:")}
    assert {x.b_id for x in report.matched} == cited
    assert report.counts()["a_xref"] == len(cited)
    assert len(m) == len(chest) + len(hpo) - len(cited)
    assert all(c.get("chosen") is None for c in report.conflicts)  # no ties among KGDX terms
    assert report.cycle == []
    validate(m)
    assert {json.loads(m.meta["merged_from"])[i]["name"] for i in (0, 1)} == {"chest-cxr", "hp"}
    report_nih = map_labels(NIH_LABELS, m, NIH_LABEL_MAP)
    assert report_nih.ok and set(report_nih.how.values()) == {"mapping"}


def test_hpo_first_keeps_hp_ids_and_label_map_still_works(chest: Ontology, hpo: Ontology) -> None:
    m, report = merge(hpo, chest)
    assert report.counts()["b_xref"] >= 100
    nih = map_labels(NIH_LABELS, m, NIH_LABEL_MAP)
    assert nih.ok
    assert nih.resolved["Consolidation"] == "HP:0032177"
    assert nih.resolved["Effusion"] == "HP:0002202"
    assert nih.resolved["No Finding"].startswith("KGDX:")  # HPO has no such term
    validate(m)
