"""``kgdx ontology ...``: load, inspect, search, connect, merge and export ontologies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kg.console import byte_progress, handle_errors, print_json, step_progress
from kg.errors import KgError

if TYPE_CHECKING:
    from kg.graph import ConceptGraph
    from kg.ontology import Ontology
    from kg.store import GraphStore, VersionInfo

app = typer.Typer(
    name="ontology",
    help="Load ontologies into the versioned store and query them.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
OntologyOpt = Annotated[
    str | None,
    typer.Option(
        "--ontology",
        "-o",
        help="NAME or NAME@VERSION in the store (default: the active one, or $KGDX_ONTOLOGY).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _store() -> GraphStore:
    # Imported lazily so `kgdx --help` stays fast.
    from kg.store import GraphStore

    return GraphStore()


@app.command()
@handle_errors
def load(
    path: Annotated[Path, typer.Argument(help="Ontology file (.obo, .owl, .json, .csv, .tsv).")],
    name: Annotated[
        str | None, typer.Option(help="Name in the store (default: from file).")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option("--format", "-f", help="obo | owl | obojson | csv (default: guess)."),
    ] = None,
    activate: Annotated[bool, typer.Option(help="Make this version the active one.")] = False,
    allow_cycles: Annotated[bool, typer.Option(help="Accept is_a cycles.")] = False,
    drop_dangling: Annotated[
        bool, typer.Option(help="Drop relations to undefined concepts instead of failing.")
    ] = False,
    quiet: QuietOpt = False,
    json: JsonOpt = False,
) -> None:
    """Parse an ontology file and store it as an immutable version.

    Example: kgdx ontology load hp.obo --name hpo --activate
    """
    from kg.loaders import FORMATS, load_ontology

    if format is not None and format not in FORMATS:
        raise KgError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    with byte_progress(f"parsing {path.name}", quiet=quiet) as progress:
        ontology = load_ontology(
            path,
            format=format,
            name=name,
            allow_cycles=allow_cycles,
            drop_dangling=drop_dangling,
            progress=progress,
        )
    store = _store()
    with step_progress("storing", quiet=quiet) as progress:
        info, created = store.save(ontology, activate=activate, progress=progress)
    if json:
        print_json({"created": created, **_version_dict(info)})
        return
    verb = "stored" if created else "already stored"
    typer.echo(
        f"{verb} {info.ref}: {info.n_concepts} concepts, {info.n_relations} relations"
        + (" (active)" if info.active else "")
    )


@app.command("list")
@handle_errors
def list_(
    name: Annotated[str | None, typer.Argument(help="Only versions of this name.")] = None,
    json: JsonOpt = False,
) -> None:
    """List stored ontologies and their versions.

    Example: kgdx ontology list
    """
    versions = _store().versions(name)
    if json:
        print_json({"ontologies": [_version_dict(v) for v in versions]})
        return
    if not versions:
        typer.echo("no ontologies stored; load one with `kgdx ontology load FILE`")
        return
    for v in versions:
        mark = "*" if v.active else " "
        typer.echo(
            f"{mark} {v.ref:40s} {v.n_concepts:>8d} concepts {v.n_relations:>8d} relations"
            f"  {v.format:8s} {v.created_at}"
        )


@app.command()
@handle_errors
def show(
    concept_id: Annotated[str, typer.Argument(help="Concept id, e.g. HP:0002202.")],
    ontology: OntologyOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show one concept with its relations.

    Example: kgdx ontology show HP:0002202
    """
    store = _store()
    info = store.resolve(ontology)
    graph = store.graph(info.ref)
    concept = store.concept(_canonical_id(store, graph, info.ref, concept_id), info.ref)
    node = graph.node(concept.id)
    neighbours = [
        {
            "relation": graph.relations[r],
            "direction": "forward" if d == 1 else "backward",
            "id": graph.ids[v],
            "label": graph.labels[v],
        }
        for v, r, d, _ in graph.adjacency[node]
    ]
    if json:
        print_json({"ontology": _version_dict(info), **concept.to_dict(), "relations": neighbours})
        return
    typer.echo(f"{concept.id}  {concept.label}" + ("  [obsolete]" if concept.obsolete else ""))
    if concept.definition:
        typer.echo(f"  definition: {concept.definition}")
    if concept.synonyms:
        typer.echo(f"  synonyms:   {'; '.join(concept.synonyms)}")
    if concept.xrefs:
        typer.echo(f"  xrefs:      {', '.join(concept.xrefs)}")
    if concept.replaced_by:
        typer.echo(f"  replaced by: {', '.join(concept.replaced_by)}")
    for n in neighbours:
        arrow = f"-{n['relation']}->" if n["direction"] == "forward" else f"<-{n['relation']}-"
        typer.echo(f"  {arrow} {n['id']} {n['label']}")


@app.command()
@handle_errors
def search(
    text: Annotated[str, typer.Argument(help="Words to look for in labels and synonyms.")],
    ontology: OntologyOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most hits to show.")] = 20,
    json: JsonOpt = False,
) -> None:
    """Find concepts by label or synonym.

    Example: kgdx ontology search "pleural effusion"
    """
    store = _store()
    info = store.resolve(ontology)
    hits = store.search(text, info.ref, limit=limit)
    if json:
        print_json(
            {
                "ontology": info.ref,
                "hits": [
                    {"id": h.concept_id, "label": h.label, "matched": h.matched, "score": h.score}
                    for h in hits
                ],
            }
        )
        return
    if not hits:
        typer.echo(f"no concept matches {text!r} in {info.ref}")
    for h in hits:
        extra = f"  (synonym: {h.matched})" if h.matched != h.label else ""
        typer.echo(f"{h.concept_id:16s} {h.label}{extra}")


@app.command()
@handle_errors
def paths(
    source: Annotated[str, typer.Argument(metavar="FROM", help="Start concept id.")],
    target: Annotated[str, typer.Argument(metavar="TO", help="End concept id.")],
    max_hops: Annotated[int, typer.Option("--max-hops", help="Longest path (1-6).")] = 4,
    k: Annotated[int, typer.Option("-k", help="How many paths, best first.")] = 5,
    relation: Annotated[
        list[str] | None, typer.Option("--relation", "-r", help="Only these relations.")
    ] = None,
    ontology: OntologyOpt = None,
    json: JsonOpt = False,
) -> None:
    """Top-k paths between two concepts, following relations either way.

    Example: kgdx ontology paths HP:0032177 HP:0002088 --json
    """
    from kg.paths import PathFinder

    store = _store()
    info = store.resolve(ontology)
    graph = store.graph(info.ref)
    found = PathFinder(graph).paths(
        _canonical_id(store, graph, info.ref, source),
        _canonical_id(store, graph, info.ref, target),
        max_hops=max_hops,
        k=k,
        relations=relation or None,
    )
    if json:
        print_json({"ontology": info.ref, "paths": [p.to_dict() for p in found]})
        return
    if not found:
        typer.echo(f"no path of at most {max_hops} hops from {source} to {target} in {info.ref}")
    for p in found:
        typer.echo(f"{p.score:.3f}  {p}")


@app.command()
@handle_errors
def stats(ontology: OntologyOpt = None, json: JsonOpt = False) -> None:
    """Counts of concepts, relations by type and xrefs by prefix.

    Example: kgdx ontology stats -o hpo
    """
    store = _store()
    info = store.resolve(ontology)
    data = store.stats(info.ref)
    if json:
        print_json({"ontology": _version_dict(info), "stats": data})
        return
    typer.echo(info.ref)
    _print_nested(data, indent=1)


@app.command()
@handle_errors
def merge(
    a: Annotated[str, typer.Argument(help="First ontology: NAME[@VERSION] or a file.")],
    b: Annotated[str, typer.Argument(help="Second ontology: NAME[@VERSION] or a file.")],
    by: Annotated[str, typer.Option(help="Unify concepts by shared 'xref' or 'id'.")] = "xref",
    name: Annotated[str | None, typer.Option(help="Name of the merged ontology.")] = None,
    activate: Annotated[bool, typer.Option(help="Make the merged version active.")] = False,
    quiet: QuietOpt = False,
    json: JsonOpt = False,
) -> None:
    """Merge two ontologies into one graph through shared xrefs or ids and store it.

    Example: kgdx ontology merge chest-cxr hpo --by xref --name chest-hpo
    """
    from kg.merge import merge as merge_ontologies

    if by not in ("xref", "id"):
        raise KgError(f"--by must be 'xref' or 'id', got {by!r}")
    store = _store()
    left = _ontology_from(store, a, quiet)
    right = _ontology_from(store, b, quiet)
    merged, report = merge_ontologies(left, right, by=by, name=name)  # type: ignore[arg-type]
    with step_progress("storing", quiet=quiet) as progress:
        info, created = store.save(merged, activate=activate, progress=progress)
    if json:
        print_json({"created": created, **_version_dict(info), "report": report.to_dict()})
        return
    typer.echo(
        f"{'stored' if created else 'already stored'} {info.ref}: {info.n_concepts} concepts, "
        f"{info.n_relations} relations; {len(report.matched)} "
        "concepts unified"
    )


@app.command()
@handle_errors
def export(
    format: Annotated[str, typer.Option("--format", "-f", help="obojson | csv | obo.")] = "obojson",
    out: Annotated[
        Path | None, typer.Option("--out", help="Output file (obojson/obo: default stdout).")
    ] = None,
    ontology: OntologyOpt = None,
    json: JsonOpt = False,
) -> None:
    """Write a stored ontology as OBO Graphs JSON, CSV edge list (+ concepts table) or OBO.

    Example: kgdx ontology export --format csv --out chest.csv -o chest-cxr
    """
    from kg.export import export_ontology

    if format not in ("obojson", "csv", "obo"):
        raise KgError(f"unknown export format {format!r}; choose obojson, csv or obo")
    if format == "csv" and out is None:
        raise KgError("--out is required for csv (it writes an edges file and a concepts file)")
    store = _store()
    info = store.resolve(ontology)
    onto = store.load(info.ref)
    if out is None:
        export_ontology(onto, sys.stdout, format)
        return
    written = export_ontology(onto, out, format)
    files = [str(p) for p in written] if isinstance(written, list | tuple) else [str(out)]
    if json:
        print_json({"ontology": info.ref, "format": format, "files": files})
    else:
        typer.echo(f"wrote {', '.join(files)}")


@app.command()
@handle_errors
def activate(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="Version to activate.")],
    json: JsonOpt = False,
) -> None:
    """Make a stored version the active one of its name.

    Example: kgdx ontology activate hpo@3f2a9c1d
    """
    info = _store().activate(ref)
    if json:
        print_json(_version_dict(info))
    else:
        typer.echo(f"active: {info.ref}")


@app.command()
@handle_errors
def remove(
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="What to remove.")],
    json: JsonOpt = False,
) -> None:
    """Remove one version, or every version of a name.

    Example: kgdx ontology remove hpo@3f2a9c1d
    """
    removed = _store().remove(ref)
    if json:
        print_json({"removed": [_version_dict(v) for v in removed]})
    else:
        for v in removed:
            typer.echo(f"removed {v.ref}")


@app.command("map")
@handle_errors
def map_(
    labels: Annotated[list[str], typer.Argument(help="Dataset labels, e.g. Effusion Pneumonia.")],
    mapping: Annotated[
        Path | None, typer.Option(help="CSV file label,concept_id with explicit choices.")
    ] = None,
    ontology: OntologyOpt = None,
    json: JsonOpt = False,
) -> None:
    """Map dataset labels to concepts (mapping file, id, label, synonym, xref).

    Example: kgdx ontology map Effusion Pleural_Thickening UMLS:C0032285
    """
    from kg.mapping import map_labels

    store = _store()
    info = store.resolve(ontology)
    report = map_labels(labels, store.load(info.ref), mapping)
    if json:
        print_json({"ontology": info.ref, **report.to_dict()})
        return
    for label in labels:
        if label in report.resolved:
            typer.echo(f"{label:24s} -> {report.resolved[label]} ({report.how[label]})")
        elif label in report.ambiguous:
            typer.echo(f"{label:24s} ambiguous: {', '.join(report.ambiguous[label])}")
        else:
            typer.echo(f"{label:24s} unresolved")


def _canonical_id(store: GraphStore, graph: ConceptGraph, ref: str, concept_id: str) -> str:
    """``concept_id`` itself, or the one concept that carries it as an xref.

    After a merge, a concept of the second ontology lives on under the first one's id with
    its own id kept as an xref (``HP:0002090`` is ``KGDX:0000114`` in ``chest-hpo``).
    """
    if concept_id in graph.index:
        return concept_id
    carriers = store.by_xref(concept_id, ref)
    if len(carriers) == 1:
        typer.echo(f"note: {concept_id} is {carriers[0]} in {ref}", err=True)
        return carriers[0]
    if len(carriers) > 1:
        raise KgError(f"{concept_id} is not a concept id of {ref}; xref of {', '.join(carriers)}")
    return concept_id  # the caller's lookup raises NotFoundError naming it


def _ontology_from(store: GraphStore, ref: str, quiet: bool) -> Ontology:
    """A stored ontology by reference, or a file loaded on the fly."""
    from kg.loaders import load_ontology

    path = Path(ref)
    if path.is_file():
        with byte_progress(f"parsing {path.name}", quiet=quiet) as progress:
            return load_ontology(path, progress=progress)
    return store.load(store.resolve(ref).ref)


def _version_dict(info: VersionInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "version": info.version,
        "ref": info.ref,
        "active": info.active,
        "concepts": info.n_concepts,
        "relations": info.n_relations,
        "format": info.format,
        "source": info.source,
        "created_at": info.created_at,
    }


def _print_nested(data: dict[str, object], indent: int) -> None:
    pad = "  " * indent
    for key, value in data.items():
        if isinstance(value, dict):
            typer.echo(f"{pad}{key}:")
            _print_nested(value, indent + 1)
        else:
            typer.echo(f"{pad}{key}: {value}")
