"""Write an :class:`Ontology` as OBO Graphs JSON, a CSV/TSV edge list, or an OBO file.

Each format is written so that :func:`kg.loaders.load_ontology` reads back an ontology with
the same :meth:`~kg.ontology.Ontology.content_hash`: relation weights and sources travel as
edge ``basicPropertyValues`` in JSON, as columns in CSV and as ``{weight=..., source=...}``
qualifiers in OBO; obsolescence and replacements travel too.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from kg.loaders.edgelist import join_list
from kg.loaders.iri import PREDICATE_IDS, curie_to_iri
from kg.ontology import Ontology, Relation

EXPORT_FORMATS = ("obojson", "csv", "obo")
#: ``basicPropertyValues`` predicates carrying a relation's weight and provenance.
WEIGHT_PRED = "https://w3id.org/kgdx/weight"
SOURCE_PRED = "https://w3id.org/kgdx/source"
REPLACED_BY_PRED = "http://purl.obolibrary.org/obo/IAO_0100001"
EXACT_SYNONYM_PRED = "hasExactSynonym"


def export_ontology(
    ontology: Ontology, path_or_stream: str | Path | IO[str], format: str
) -> list[Path]:
    """Write ``ontology`` in ``format`` (``obojson``, ``csv`` or ``obo``).

    Args:
        ontology: what to write.
        path_or_stream: a file path, or a text stream (``obojson`` and ``obo`` only; a
            ``csv`` export writes two files: the edges at the path and the concepts table
            at ``<stem>.concepts<suffix>`` beside it).
        format: one of :data:`EXPORT_FORMATS`.

    Returns:
        The files written (empty when writing to a stream).

    Raises:
        ValueError: an unknown format, or ``csv`` to a stream.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format == "csv":
        if not isinstance(path_or_stream, (str, Path)):
            raise ValueError("a csv export writes two files; pass a path, not a stream")
        return write_csv(ontology, Path(path_or_stream))
    writer = write_obojson if format == "obojson" else write_obo
    with _open_text(path_or_stream) as stream:
        writer(ontology, stream)
    return [Path(path_or_stream)] if isinstance(path_or_stream, (str, Path)) else []


@contextmanager
def _open_text(target: str | Path | IO[str]) -> Iterator[IO[str]]:
    if isinstance(target, (str, Path)):
        with Path(target).open("w", encoding="utf-8", newline="\n") as f:
            yield f
    else:
        yield target


# --- OBO Graphs JSON -------------------------------------------------------------------


def _predicate_iri(predicate: str) -> str:
    return "is_a" if predicate == "is_a" else curie_to_iri(PREDICATE_IDS.get(predicate, predicate))


def to_obograph(ontology: Ontology) -> dict[str, Any]:
    """The ontology as an OBO Graphs document (a dict ready for ``json.dump``)."""
    nodes: list[dict[str, Any]] = []
    for c in ontology.concepts.values():
        node: dict[str, Any] = {"id": curie_to_iri(c.id), "type": "CLASS"}
        if c.label:
            node["lbl"] = c.label
        meta: dict[str, Any] = {}
        if c.definition:
            meta["definition"] = {"val": c.definition}
        if c.synonyms:
            meta["synonyms"] = [{"pred": EXACT_SYNONYM_PRED, "val": s} for s in c.synonyms]
        if c.xrefs:
            meta["xrefs"] = [{"val": x} for x in c.xrefs]
        if c.obsolete:
            meta["deprecated"] = True
        if c.replaced_by:
            meta["basicPropertyValues"] = [
                {"pred": REPLACED_BY_PRED, "val": r} for r in c.replaced_by
            ]
        if meta:
            node["meta"] = meta
        nodes.append(node)
    for p in ontology.relation_types():
        if p != "is_a":
            nodes.append({"id": _predicate_iri(p), "type": "PROPERTY", "lbl": p})

    edges = [_edge(r) for r in ontology.relations]
    graph_meta: dict[str, Any] = {}
    if ontology.meta.get("data-version"):
        graph_meta["version"] = ontology.meta["data-version"]
    graph: dict[str, Any] = {
        "id": ontology.meta.get("ontology-iri") or f"urn:kgdx:ontology:{ontology.name}",
        "lbl": ontology.name,
        "nodes": nodes,
        "edges": edges,
    }
    if graph_meta:
        graph["meta"] = graph_meta
    return {"graphs": [graph]}


def _edge(r: Relation) -> dict[str, Any]:
    edge: dict[str, Any] = {
        "sub": curie_to_iri(r.subject),
        "pred": _predicate_iri(r.predicate),
        "obj": curie_to_iri(r.object),
    }
    values = []
    if r.weight is not None:
        values.append({"pred": WEIGHT_PRED, "val": repr(r.weight)})
    if r.source:
        values.append({"pred": SOURCE_PRED, "val": r.source})
    if values:
        edge["meta"] = {"basicPropertyValues": values}
    return edge


def write_obojson(ontology: Ontology, stream: IO[str]) -> None:
    """Write OBO Graphs JSON to a text stream."""
    json.dump(to_obograph(ontology), stream, ensure_ascii=False, indent=1)
    stream.write("\n")


# --- CSV / TSV -------------------------------------------------------------------------


def concepts_path_for(path: Path) -> Path:
    """Where a csv export puts the concepts table: ``<stem>.concepts<suffix>``."""
    return path.with_name(f"{path.stem}.concepts{path.suffix or '.csv'}")


def write_csv(ontology: Ontology, path: Path) -> list[Path]:
    """Write the edges to ``path`` and the concepts to :func:`concepts_path_for` it.

    Tab-separated when the path ends in ``.tsv``, comma-separated otherwise.
    """
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    concepts_path = concepts_path_for(path)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(["subject", "predicate", "object", "weight", "source"])
        for r in ontology.relations:
            w.writerow(
                [
                    r.subject,
                    r.predicate,
                    r.object,
                    "" if r.weight is None else repr(r.weight),
                    r.source,
                ]
            )
    with concepts_path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(["id", "label", "synonyms", "definition", "xrefs", "obsolete", "replaced_by"])
        for c in ontology.concepts.values():
            w.writerow(
                [
                    c.id,
                    c.label,
                    join_list(c.synonyms),
                    c.definition,
                    join_list(c.xrefs),
                    "true" if c.obsolete else "",
                    join_list(c.replaced_by),
                ]
            )
    return [path, concepts_path]


# --- OBO -------------------------------------------------------------------------------


def _escape_quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")


def _escape_unquoted(text: str) -> str:
    out = (
        text.replace("\\", "\\\\")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("!", "\\!")
        .replace("{", "\\{")
    )
    # Keep leading/trailing spaces (the reader strips plain ones).
    if out != out.strip(" "):
        core = out.strip(" ")
        lead = len(out) - len(out.lstrip(" "))
        trail = len(out) - len(out.rstrip(" "))
        out = "\\W" * lead + core + "\\W" * trail
    return out


def _escape_token(text: str) -> str:
    """An id or xref: one token, so spaces are escaped too."""
    return _escape_unquoted(text).replace(" ", "\\W")


def _qualifier_block(r: Relation) -> str:
    parts = []
    if r.weight is not None:
        parts.append(f'weight="{r.weight!r}"')
    if r.source:
        parts.append(f'source="{_escape_quoted(r.source)}"')
    return " {" + ", ".join(parts) + "}" if parts else ""


def write_obo(ontology: Ontology, stream: IO[str]) -> None:
    """Write an OBO 1.4 flat file to a text stream."""
    out = stream
    out.write("format-version: 1.4\n")
    if ontology.meta.get("data-version"):
        out.write(f"data-version: {_escape_unquoted(ontology.meta['data-version'])}\n")
    out.write(f"ontology: {_escape_token(ontology.name)}\n")
    by_subject: dict[str, list[Relation]] = defaultdict(list)
    for r in ontology.relations:
        by_subject[r.subject].append(r)
    for c in ontology.concepts.values():
        lines = ["", "[Term]", f"id: {_escape_token(c.id)}"]
        if c.label:
            lines.append(f"name: {_escape_unquoted(c.label)}")
        if c.definition:
            lines.append(f'def: "{_escape_quoted(c.definition)}" []')
        lines.extend(f'synonym: "{_escape_quoted(s)}" EXACT []' for s in c.synonyms)
        lines.extend(f"xref: {_escape_token(x)}" for x in c.xrefs)
        for r in by_subject.get(c.id, ()):
            target = _escape_token(r.object) + _qualifier_block(r)
            if r.predicate == "is_a":
                lines.append(f"is_a: {target}")
            else:
                lines.append(f"relationship: {_escape_token(r.predicate)} {target}")
        if c.obsolete:
            lines.append("is_obsolete: true")
        lines.extend(f"replaced_by: {_escape_token(x)}" for x in c.replaced_by)
        out.write("\n".join(lines))
        out.write("\n")
    for p in ontology.relation_types():
        if p == "is_a":
            continue
        out.write(f"\n[Typedef]\nid: {_escape_token(p)}\nname: {_escape_unquoted(p)}\n")
        if p in PREDICATE_IDS:
            out.write(f"xref: {PREDICATE_IDS[p]}\n")
