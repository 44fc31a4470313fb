"""A loader for CSV/TSV edge lists, with an optional concepts table beside them.

The edges file has a header naming at least ``subject``, ``predicate`` and ``object``, and
optionally ``weight`` (in (0, 1], empty for none) and ``source``. The delimiter follows the
extension (``.tsv`` tab, ``.csv`` comma) or is sniffed. Concepts come from the sibling
file ``<stem>.concepts.csv`` or ``<stem>.concepts.tsv`` when there is one, with columns
``id``, ``label`` and optionally ``synonyms``, ``definition``, ``xrefs``, ``obsolete`` and
``replaced_by`` (list columns separated by ``|``; ``\\|`` is a literal bar); without it every id
in the edges becomes a concept labelled with its id.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from kg.errors import DuplicateIdError, OntologyFormatError
from kg.loaders.iri import iri_to_curie
from kg.loaders.textfile import Progress, check_file, iter_line_blocks, iter_lines
from kg.ontology import Concept, Ontology, Relation

EDGE_COLUMNS = ("subject", "predicate", "object")
CONCEPT_COLUMNS = ("id", "label")
LIST_SEPARATOR = "|"
_TRUE = frozenset({"true", "1", "yes", "y", "t"})


def split_list(cell: str) -> list[str]:
    r"""Split a ``|``-separated cell; ``\|`` is a literal bar and ``\\`` a backslash."""
    if not cell:
        return []
    if "\\" not in cell:
        return [p.strip() for p in cell.split(LIST_SEPARATOR) if p.strip()]
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(cell):
        ch = cell[i]
        if ch == "\\" and i + 1 < len(cell) and cell[i + 1] in "|\\":
            buf.append(cell[i + 1])
            i += 2
            continue
        if ch == LIST_SEPARATOR:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def join_list(items: tuple[str, ...] | list[str]) -> str:
    """The inverse of :func:`split_list`."""
    return LIST_SEPARATOR.join(
        s.replace("\\", "\\\\").replace(LIST_SEPARATOR, "\\" + LIST_SEPARATOR) for s in items
    )


def delimiter_for(path: Path) -> str | None:
    """Tab for ``.tsv``/``.tab``, comma for ``.csv``; ``None`` when it must be sniffed."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    return None


def concepts_file_for(path: Path) -> Path | None:
    """The sibling concepts table of an edges file, if one exists."""
    stem = path.stem
    if stem.endswith(".edges"):
        stem = stem[: -len(".edges")]
    for suffix in (path.suffix, ".csv", ".tsv"):
        candidate = path.with_name(f"{stem}.concepts{suffix}")
        if candidate.is_file() and candidate != path:
            return candidate
    return None


def _sniff(path: Path) -> str:
    for _, lines in iter_line_blocks(path):
        header = lines[0] if lines else ""
        counts = {d: header.count(d) for d in ("\t", ",", ";")}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","
    return ","


class _Table:
    """A checked CSV table: header columns and rows as dicts with line numbers."""

    def __init__(self, path: Path, required: tuple[str, ...], progress: Progress | None):
        self.path = path
        check_file(path)
        delimiter = delimiter_for(path) or _sniff(path)
        self._reader = csv.reader(iter_lines(path, progress=progress), delimiter=delimiter)
        try:
            header = next(self._reader)
        except StopIteration:
            raise OntologyFormatError("no header row", path=str(path)) from None
        except csv.Error as e:
            raise OntologyFormatError(f"malformed CSV: {e}", path=str(path), line=1) from None
        self.columns = [h.strip().lower().lstrip("\ufeff") for h in header]
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise OntologyFormatError(
                f"missing column(s) {', '.join(missing)}; found columns: "
                f"{', '.join(self.columns) or '(none)'} (the first row must be a header)",
                path=str(path),
                line=1,
            )
        self.index = {c: i for i, c in enumerate(self.columns)}

    def rows(self) -> Iterator[tuple[int, list[str]]]:
        """``(line number, cells)`` for every non-blank row, padded to the header width."""
        width = len(self.columns)
        try:
            for row in self._reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) < width:
                    row = row + [""] * (width - len(row))
                yield self._reader.line_num, row
        except csv.Error as e:
            raise OntologyFormatError(
                f"malformed CSV: {e}", path=str(self.path), line=self._reader.line_num
            ) from None

    def error(self, message: str, line: int) -> OntologyFormatError:
        return OntologyFormatError(message, path=str(self.path), line=line)


def parse_edgelist(
    path: str | Path, *, name: str | None = None, progress: Progress | None = None
) -> Ontology:
    """Parse a CSV/TSV edge list (and its sibling concepts table) into an Ontology.

    Raises:
        OntologyFormatError: missing columns (naming the columns found), an empty id or
            predicate, a bad weight (with line), an empty, binary or non-UTF-8 file.
        DuplicateIdError: an id listed twice in the concepts table.
    """
    path = Path(path)
    concepts_path = concepts_file_for(path)
    concepts = _read_concepts(concepts_path) if concepts_path else {}

    table = _Table(path, EDGE_COLUMNS, progress)
    si, pi, oi = (table.index[c] for c in EDGE_COLUMNS)
    wi = table.index.get("weight")
    ri = table.index.get("source")
    interned: dict[str, str] = {cid: cid for cid in concepts}
    intern = interned.setdefault
    relations: list[Relation] = []
    for line, row in table.rows():
        s = iri_to_curie(row[si].strip())
        p = row[pi].strip()
        o = iri_to_curie(row[oi].strip())
        if not s or not p or not o:
            raise table.error("subject, predicate and object must not be empty", line)
        weight: float | None = None
        if wi is not None and row[wi].strip():
            weight = _weight(row[wi].strip(), table, line)
        source = row[ri].strip() if ri is not None else ""
        relations.append(Relation(intern(s, s), p, intern(o, o), weight, source))

    if concepts_path is None:
        for cid in interned:
            concepts[cid] = Concept(cid, cid)
    meta = {"format": "csv", "source": path.name}
    if concepts_path is not None:
        meta["concepts-source"] = concepts_path.name
    return Ontology(name=name or path.stem, concepts=concepts, relations=relations, meta=meta)


def _weight(raw: str, table: _Table, line: int) -> float:
    try:
        w = float(raw)
    except ValueError:
        raise table.error(f"weight must be a number in (0, 1], got {raw!r}", line) from None
    if not 0.0 < w <= 1.0:
        raise table.error(f"weight must be in (0, 1], got {raw!r}", line)
    return w


def _read_concepts(path: Path) -> dict[str, Concept]:
    table = _Table(path, CONCEPT_COLUMNS, None)
    ix = table.index

    def cell(row: list[str], column: str) -> str:
        i = ix.get(column)
        return row[i].strip() if i is not None else ""

    concepts: dict[str, Concept] = {}
    first_line: dict[str, int] = {}
    for line, row in table.rows():
        cid = iri_to_curie(cell(row, "id"))
        if not cid:
            raise table.error("empty id", line)
        if cid in concepts:
            raise DuplicateIdError(
                cid, f" at {path}, line {line} (first at line {first_line[cid]})"
            )
        first_line[cid] = line
        concepts[cid] = Concept(
            cid,
            cell(row, "label"),
            tuple(dict.fromkeys(split_list(cell(row, "synonyms")))),
            cell(row, "definition"),
            tuple(dict.fromkeys(split_list(cell(row, "xrefs")))),
            cell(row, "obsolete").lower() in _TRUE,
            tuple(dict.fromkeys(split_list(cell(row, "replaced_by")))),
        )
    return concepts
