"""Load an ontology file of any supported format into a validated :class:`Ontology`.

``load_ontology`` picks the format from the extension (or the first bytes), runs the
format's parser (:mod:`.obo`, :mod:`.owl`, :mod:`.obojson`, :mod:`.edgelist`) and then
:func:`kg.validate.validate`. Every problem a user can cause is a :class:`~kg.errors.KgError`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kg.errors import OntologyFormatError
from kg.loaders.edgelist import parse_edgelist
from kg.loaders.obo import parse_obo
from kg.loaders.obojson import parse_obojson
from kg.loaders.owl import parse_owl
from kg.loaders.textfile import Progress, binary_error, check_file
from kg.ontology import Ontology
from kg.validate import validate

__all__ = ["FORMATS", "detect_format", "load_ontology"]

FORMATS = ("obo", "owl", "obojson", "csv")

_PARSERS: dict[str, Callable[..., Ontology]] = {
    "obo": parse_obo,
    "owl": parse_owl,
    "obojson": parse_obojson,
    "csv": parse_edgelist,
}
_EXTENSIONS = {
    ".obo": "obo",
    ".owl": "owl",
    ".rdf": "owl",
    ".xml": "owl",
    ".json": "obojson",
    ".csv": "csv",
    ".tsv": "csv",
    ".tab": "csv",
}
#: Other names people use for a format, accepted by ``format=``.
_ALIASES = {"json": "obojson", "obographs": "obojson", "rdf": "owl", "xml": "owl", "tsv": "csv"}


def detect_format(path: Path) -> str:
    """The format of ``path``: by extension, else by sniffing its first bytes.

    Raises:
        OntologyFormatError: a missing, empty or binary file, or no recognisable format.
    """
    path = Path(path)
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt:
        return fmt
    check_file(path)
    with path.open("rb") as f:
        head = f.read(4096)
    error = binary_error(head, path)
    if error is not None:
        raise error
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    first_line = text.split("\n", 1)[0].strip()
    if text.startswith("<"):
        return "owl"
    if text.startswith("{"):
        return "obojson"
    if (
        text.startswith(("format-version:", "[Term]", "[Typedef]"))
        or "\n[Term]" in text
        or first_line.startswith(("data-version:", "ontology:"))
    ):
        return "obo"
    header = {h.strip().lower() for h in first_line.replace("\t", ",").split(",")}
    if {"subject", "predicate", "object"} <= header:
        return "csv"
    raise OntologyFormatError(
        f"unknown ontology format (extension {path.suffix or '(none)'!r}); expected one of "
        f"{', '.join(FORMATS)} - pass format= / --format",
        path=str(path),
    )


def load_ontology(
    path: str | Path,
    *,
    format: str | None = None,
    name: str | None = None,
    allow_cycles: bool = False,
    drop_dangling: bool = False,
    progress: Progress | None = None,
) -> Ontology:
    """Load and validate an ontology file.

    Args:
        path: an OBO, OWL (RDF/XML), OBO Graphs JSON or CSV/TSV edge-list file.
        format: one of :data:`FORMATS`; detected from the file when ``None``.
        name: ontology name; defaults to the OBO ``ontology:`` header, else the file stem.
        allow_cycles: keep ``is_a`` cycles instead of raising :class:`~kg.errors.CycleError`.
        drop_dangling: drop relations to undefined concepts instead of raising
            :class:`~kg.errors.DanglingReferenceError`.
        progress: called as ``progress(done_bytes, total_bytes)`` now and then.

    Returns:
        The ontology, with ``meta`` holding ``format``, ``source`` (the file name) and
        ``data-version`` when the file states one.

    Raises:
        OntologyFormatError: missing file, unknown format, syntax errors (with line).
        OntologyValidationError: duplicate ids, cycles, dangling references.
    """
    path = Path(path)
    check_file(path)
    if format is None:
        fmt = detect_format(path)
    else:
        fmt = _ALIASES.get(format.lower(), format.lower())
        if fmt not in FORMATS:
            raise OntologyFormatError(
                f"unknown format {format!r}; expected one of {', '.join(FORMATS)}",
                path=str(path),
            )
    with _gc_paused():
        ontology = _PARSERS[fmt](path, name=name, progress=progress)
        return validate(ontology, allow_cycles=allow_cycles, drop_dangling=drop_dangling)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small objects are created.

    Parsing builds no reference cycles, but each generation-2 collection walks every
    concept and relation made so far; pausing it cuts a 1M-edge load by about a third.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
