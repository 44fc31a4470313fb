"""A loader for OBO Graphs JSON (https://github.com/geneontology/obographs).

Reads ``{"graphs": [{"nodes": [...], "edges": [...], "meta": {...}}]}`` (a bare graph
object is accepted too). Node and edge ids may be IRIs or CURIEs; OBO IRIs become CURIEs.
``CLASS`` nodes (or nodes without a type) become concepts; ``PROPERTY`` nodes name the
relations that use them. An edge's weight and provenance may sit in its
``meta.basicPropertyValues`` under a ``pred`` ending in ``weight`` / ``source``, which is
how :mod:`kg.export` writes them. Every structural problem is reported with its JSON path
(``graphs[0].nodes[12].id``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kg.errors import DuplicateIdError, OntologyFormatError
from kg.loaders.iri import iri_to_curie, predicate_name
from kg.loaders.textfile import Progress, check_bytes, check_file
from kg.ontology import Concept, Ontology, Relation

#: Refuse JSON documents above this size: ``json`` holds the whole document in memory.
MAX_JSON_BYTES = 1 << 30
REPLACED_BY_PREDS = ("IAO_0100001", "IAO:0100001", "term_replaced_by", "replaced_by")
#: Edge predicates between properties or individuals, not between concepts.
SKIPPED_PREDS = frozenset({"subPropertyOf", "inverseOf", "type", "instanceOf"})


class _JsonShapeError(Exception):
    """A value of the wrong shape at a JSON path."""


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind):
        names = (
            " or ".join(_JSON_NAMES[k] for k in kind)
            if isinstance(kind, tuple)
            else _JSON_NAMES[kind]
        )
        got = _JSON_NAMES.get(type(value), type(value).__name__)
        raise _JsonShapeError(f"{where}: expected {names}, got {got}")
    return value


_JSON_NAMES: dict[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "true/false",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _meta_list(meta: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    items = _expect(meta.get(key, []), list, f"{where}.{key}")
    return [_expect(x, dict, f"{where}.{key}[{i}]") for i, x in enumerate(items)]


def _val(item: dict[str, Any], where: str) -> str:
    v = item.get("val")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(v)
    return str(_expect(v, str, f"{where}.val"))


def parse_obojson(
    path: str | Path, *, name: str | None = None, progress: Progress | None = None
) -> Ontology:
    """Parse an OBO Graphs JSON file into an :class:`Ontology` (not yet validated).

    Raises:
        OntologyFormatError: invalid JSON (with line), a value of the wrong shape (with its
            JSON path), a file over :data:`MAX_JSON_BYTES`, an empty or binary file.
        DuplicateIdError: two class nodes with one id.
    """
    path = Path(path)
    where = str(path)
    total = check_file(path)
    if total > MAX_JSON_BYTES:
        raise OntologyFormatError(
            f"JSON file of {total} bytes is over the {MAX_JSON_BYTES}-byte limit", path=where
        )
    text = check_bytes(path.read_bytes(), path)
    if progress is not None:
        progress(total // 2, total)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise OntologyFormatError(
            f"invalid JSON: {e.msg} (column {e.colno})", path=where, line=e.lineno
        ) from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise OntologyFormatError(
            "invalid JSON: nested too deeply (not an OBO Graphs document)", path=where
        ) from None
    del text
    try:
        onto = _read_document(doc, path, name)
    except _JsonShapeError as e:
        raise OntologyFormatError(str(e), path=where) from None
    if progress is not None:
        progress(total, total)
    return onto


def _read_document(doc: Any, path: Path, name: str | None) -> Ontology:
    if isinstance(doc, dict) and "graphs" not in doc and "nodes" in doc:
        graphs = [doc]
        prefix = ""
    else:
        _expect(doc, dict, "$")
        if "graphs" not in doc:
            raise _JsonShapeError("$: no 'graphs' array; not an OBO Graphs document")
        graphs = _expect(doc["graphs"], list, "graphs")
        prefix = "graphs"

    concepts: dict[str, Concept] = {}
    positions: dict[str, str] = {}
    prop_labels: dict[str, str] = {}
    meta = {"format": "obojson", "source": path.name}
    edge_lists: list[tuple[str, list[Any]]] = []
    for gi, graph in enumerate(graphs):
        gw = f"{prefix}[{gi}]" if prefix else "$"
        _expect(graph, dict, gw)
        gmeta = _expect(graph.get("meta") or {}, dict, f"{gw}.meta")
        if isinstance(gmeta.get("version"), str) and "data-version" not in meta:
            meta["data-version"] = gmeta["version"]
        for i, bpv in enumerate(_meta_list(gmeta, "basicPropertyValues", f"{gw}.meta")):
            pred = str(bpv.get("pred", ""))
            if pred.endswith("versionInfo") and "data-version" not in meta:
                meta["data-version"] = _val(bpv, f"{gw}.meta.basicPropertyValues[{i}]")
        nodes = _expect(graph.get("nodes", []), list, f"{gw}.nodes")
        for ni, node in enumerate(nodes):
            nw = f"{gw}.nodes[{ni}]"
            _read_node(node, nw, concepts, positions, prop_labels)
        edge_lists.append((gw, _expect(graph.get("edges", []), list, f"{gw}.edges")))

    relations: list[Relation] = []
    interned: dict[str, str] = {cid: cid for cid in concepts}
    intern = interned.setdefault
    for gw, edges in edge_lists:
        for ei, edge in enumerate(edges):
            ew = f"{gw}.edges[{ei}]"
            _expect(edge, dict, ew)
            sub = _expect(edge.get("sub"), str, f"{ew}.sub")
            pred = _expect(edge.get("pred"), str, f"{ew}.pred")
            obj = _expect(edge.get("obj"), str, f"{ew}.obj")
            if pred in SKIPPED_PREDS:
                continue
            weight, source = _edge_meta(edge, ew)
            s = iri_to_curie(sub)
            o = iri_to_curie(obj)
            relations.append(
                Relation(
                    intern(s, s), predicate_name(pred, prop_labels), intern(o, o), weight, source
                )
            )
    return Ontology(name=name or path.stem, concepts=concepts, relations=relations, meta=meta)


def _read_node(
    node: Any,
    nw: str,
    concepts: dict[str, Concept],
    positions: dict[str, str],
    prop_labels: dict[str, str],
) -> None:
    _expect(node, dict, nw)
    raw_id = _expect(node.get("id"), str, f"{nw}.id")
    if not raw_id:
        raise _JsonShapeError(f"{nw}.id: empty id")
    cid = iri_to_curie(raw_id)
    kind = node.get("type", "CLASS")
    label = _expect(node.get("lbl", ""), str, f"{nw}.lbl")
    meta = _expect(node.get("meta") or {}, dict, f"{nw}.meta")
    if kind == "PROPERTY":
        short = ""
        for i, bpv in enumerate(_meta_list(meta, "basicPropertyValues", f"{nw}.meta")):
            if str(bpv.get("pred", "")).endswith("shorthand"):
                short = _val(bpv, f"{nw}.meta.basicPropertyValues[{i}]")
        if short or label:
            prop_labels[cid] = short or label
        return
    if kind not in ("CLASS", None):
        return
    if cid in concepts:
        raise DuplicateIdError(cid, f" at {nw} (first at {positions[cid]})")
    positions[cid] = nw
    definition = ""
    if meta.get("definition") is not None:
        d = _expect(meta["definition"], dict, f"{nw}.meta.definition")
        definition = _val(d, f"{nw}.meta.definition") if "val" in d else ""
    synonyms = [
        _val(s, f"{nw}.meta.synonyms[{i}]")
        for i, s in enumerate(_meta_list(meta, "synonyms", f"{nw}.meta"))
    ]
    xrefs = [
        _val(x, f"{nw}.meta.xrefs[{i}]")
        for i, x in enumerate(_meta_list(meta, "xrefs", f"{nw}.meta"))
    ]
    deprecated = _expect(meta.get("deprecated", False), bool, f"{nw}.meta.deprecated")
    replaced: list[str] = []
    for i, bpv in enumerate(_meta_list(meta, "basicPropertyValues", f"{nw}.meta")):
        if str(bpv.get("pred", "")).endswith(REPLACED_BY_PREDS):
            replaced.append(iri_to_curie(_val(bpv, f"{nw}.meta.basicPropertyValues[{i}]")))
    concepts[cid] = Concept(
        cid,
        label,
        tuple(dict.fromkeys(synonyms)),
        definition,
        tuple(dict.fromkeys(xrefs)),
        deprecated,
        tuple(dict.fromkeys(replaced)),
    )


def _edge_meta(edge: dict[str, Any], ew: str) -> tuple[float | None, str]:
    """Weight and source from an edge's ``meta.basicPropertyValues``."""
    meta = edge.get("meta")
    if not meta:
        return None, ""
    _expect(meta, dict, f"{ew}.meta")
    weight: float | None = None
    source = ""
    for i, bpv in enumerate(_meta_list(meta, "basicPropertyValues", f"{ew}.meta")):
        pw = f"{ew}.meta.basicPropertyValues[{i}]"
        pred = str(bpv.get("pred", "")).lower()
        if pred.endswith("weight"):
            raw = _val(bpv, pw)
            try:
                weight = float(raw)
            except ValueError:
                raise _JsonShapeError(f"{pw}.val: weight must be a number, got {raw!r}") from None
            if not 0.0 < weight <= 1.0:
                raise _JsonShapeError(f"{pw}.val: weight must be in (0, 1], got {raw!r}")
        elif pred.endswith("source"):
            source = _val(bpv, pw)
    return weight, source
