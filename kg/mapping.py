"""Dataset label -> concept id.

A training set names its findings by strings (``Pleural_Thickening``, ``No Finding``,
``UMLS:C0032285``); the model needs concept ids of the ontology it serves against.
:func:`map_labels` resolves each label by the first of these that finds anything:

1. ``mapping``: an explicit table (a dict or a CSV file ``label,concept_id``);
2. ``id``: the label is a concept id;
3. ``label``: the label equals a concept's preferred name;
4. ``synonym``: the label equals one of a concept's synonyms;
5. ``xref``: the label is a cross-reference (``UMLS:C0032285``) that a concept carries.

Names are compared after :func:`normalize` (case-insensitive, ``_`` and runs of spaces
equivalent). Obsolete concepts are never returned: one with ``replaced_by`` is followed to
its replacement, one without is skipped. Several concepts at the first level that finds any
make the label *ambiguous*; the report lists them rather than guessing.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kg.errors import MappingError
from kg.ontology import Ontology

__all__ = [
    "CHEST_CXR_OBO",
    "DATA_DIR",
    "NIH_LABEL_MAP",
    "MappingReport",
    "Method",
    "load_mapping",
    "map_labels",
    "normalize",
    "require_all",
]

#: Data files that ship with the package.
DATA_DIR = Path(__file__).resolve().parent / "data"
#: The bundled chest-radiograph knowledge graph.
CHEST_CXR_OBO = DATA_DIR / "chest_cxr.obo"
#: NIH ChestX-ray14 and CheXpert label names -> ids of :data:`CHEST_CXR_OBO`.
NIH_LABEL_MAP = DATA_DIR / "nih_label_map.csv"

Method = Literal["mapping", "id", "label", "synonym", "xref"]

_SPACES = re.compile(r"[\s_]+")


def normalize(text: str) -> str:
    """Comparison key of a name: case-folded, ``_`` and whitespace runs as one space."""
    return _SPACES.sub(" ", text).strip().casefold()


@dataclass
class MappingReport:
    """Outcome of :func:`map_labels`, one entry per distinct input label.

    Attributes:
        resolved: label -> concept id.
        how: label -> the level that resolved it (``mapping``, ``id``, ``label``,
            ``synonym`` or ``xref``).
        unresolved: labels nothing matched, in input order.
        ambiguous: label -> the candidate ids (sorted) when several concepts matched at the
            best level.
        notes: label -> why a label was not taken from the mapping table, when the table
            named it but its target is missing from the ontology.
    """

    resolved: dict[str, str] = field(default_factory=dict)
    how: dict[str, Method] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every label resolved to exactly one concept."""
        return not self.unresolved and not self.ambiguous

    def to_dict(self) -> dict[str, object]:
        return {
            "resolved": dict(self.resolved),
            "how": dict(self.how),
            "unresolved": list(self.unresolved),
            "ambiguous": {k: list(v) for k, v in self.ambiguous.items()},
            "notes": dict(self.notes),
        }


def load_mapping(path: str | Path) -> dict[str, str]:
    """Read a mapping CSV with a ``label,concept_id`` header (further columns ignored).

    Blank rows and rows whose first cell starts with ``#`` are skipped.

    Raises:
        MappingError: the file is missing, has no such header, has an empty cell, or maps
            one label (after :func:`normalize`) to two different ids.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MappingError(f"mapping file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MappingError(f"cannot read mapping file {path}: {e}") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise MappingError(f"mapping file {path} is empty; expected a 'label,concept_id' header")
    header = [h.strip().lower() for h in rows[0]]
    if "label" not in header or "concept_id" not in header:
        raise MappingError(
            f"mapping file {path} must have a 'label,concept_id' header, got {rows[0]!r}"
        )
    li, ci = header.index("label"), header.index("concept_id")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n, row in enumerate(rows[1:], 2):
        if all(not c.strip() for c in row):
            continue
        label = row[li].strip() if li < len(row) else ""
        cid = row[ci].strip() if ci < len(row) else ""
        if not label or not cid:
            raise MappingError(f"mapping file {path}, row {n}: empty label or concept_id: {row!r}")
        key = normalize(label)
        if key in seen and out[seen[key]] != cid:
            raise MappingError(
                f"mapping file {path}, row {n}: label {label!r} maps to {cid!r} but "
                f"{seen[key]!r} already maps to {out[seen[key]]!r}"
            )
        seen.setdefault(key, label)
        out[label] = cid
    return out


class _Index:
    """Lookup tables of one ontology, built once per :func:`map_labels` call."""

    def __init__(self, ontology: Ontology) -> None:
        self.ontology = ontology
        self.by_label: dict[str, set[str]] = {}
        self.by_synonym: dict[str, set[str]] = {}
        self.by_xref: dict[str, set[str]] = {}
        self.by_id_folded: dict[str, set[str]] = {}
        for c in ontology.concepts.values():
            self.by_id_folded.setdefault(c.id.casefold(), set()).add(c.id)
            if c.label:
                self.by_label.setdefault(normalize(c.label), set()).add(c.id)
            for s in c.synonyms:
                self.by_synonym.setdefault(normalize(s), set()).add(c.id)
            for x in c.xrefs:
                self.by_xref.setdefault(x.strip().casefold(), set()).add(c.id)

    def live(self, ids: Iterable[str]) -> list[str]:
        """Replace obsolete ids by their replacements (transitively), drop dead ends."""
        out: set[str] = set()
        for cid in ids:
            out.update(self._follow(cid, set()))
        return sorted(out)

    def _follow(self, cid: str, seen: set[str]) -> set[str]:
        c = self.ontology.concepts.get(cid)
        if c is None or cid in seen:
            return set()
        if not c.obsolete:
            return {cid}
        seen.add(cid)
        out: set[str] = set()
        for r in c.replaced_by:
            out |= self._follow(r, seen)
        return out

    def concept_for_id(self, cid: str) -> list[str]:
        """A concept id, spelled exactly or with other letter case; else concepts that carry
        it as an xref (an id of an ontology merged into this one)."""
        if cid in self.ontology.concepts:
            return self.live([cid])
        found = self.live(self.by_id_folded.get(cid.casefold(), ()))
        if found:
            return found
        return self.live(self.by_xref.get(cid.strip().casefold(), ()))


def map_labels(
    labels: Iterable[str],
    ontology: Ontology,
    mapping: Mapping[str, str] | str | Path | None = None,
) -> MappingReport:
    """Resolve dataset labels to concept ids of ``ontology``.

    Args:
        labels: label strings; duplicates are resolved once.
        ontology: the ontology to resolve into.
        mapping: an explicit table ``{label: concept_id}`` or the path of a
            ``label,concept_id`` CSV (see :func:`load_mapping`); its labels are matched
            after :func:`normalize`. A target id absent from the ontology is looked up as
            an xref (so a table written for one ontology still works on a merge that kept
            its ids as xrefs); failing that the label falls through to the other levels
            and the report notes why.

    Returns:
        A :class:`MappingReport`.
    """
    if isinstance(labels, str):
        raise MappingError(f"labels must be a list of strings, got the string {labels!r}")
    if isinstance(mapping, (str, Path)):
        table: Mapping[str, str] = load_mapping(mapping)
    elif mapping is None:
        table = {}
    else:
        table = mapping
    by_norm: dict[str, str] = {}
    for k, v in table.items():
        by_norm.setdefault(normalize(k), v)

    index = _Index(ontology)
    report = MappingReport()
    for label in dict.fromkeys(labels):
        if not isinstance(label, str):
            raise MappingError(f"labels must be strings, got {label!r}")
        method, ids = _resolve(label, index, by_norm, report)
        if not ids:
            report.unresolved.append(label)
        elif len(ids) > 1:
            report.ambiguous[label] = ids
        else:
            assert method is not None
            report.resolved[label] = ids[0]
            report.how[label] = method
    return report


def _resolve(
    label: str, index: _Index, table: dict[str, str], report: MappingReport
) -> tuple[Method | None, list[str]]:
    key = normalize(label)
    if not key:
        return None, []
    target = table.get(key)
    if target is not None:
        ids = index.concept_for_id(target)
        if ids:
            return "mapping", ids
        report.notes[label] = f"mapping names {target!r}, which is not a live concept here"
    stripped = label.strip()
    ids = index.live(index.by_id_folded.get(stripped.casefold(), ()))
    if ids:
        return "id", ids
    ids = index.live(index.by_label.get(key, ()))
    if ids:
        return "label", ids
    ids = index.live(index.by_synonym.get(key, ()))
    if ids:
        return "synonym", ids
    ids = index.live(index.by_xref.get(stripped.casefold(), ()))
    if ids:
        return "xref", ids
    return None, []


def require_all(report: MappingReport) -> MappingReport:
    """Return ``report`` if every label resolved to one concept, else raise.

    Raises:
        MappingError: naming the unresolved labels and the ambiguous ones with their
            candidate ids.
    """
    if report.ok:
        return report
    parts = []
    if report.unresolved:
        parts.append(f"{len(report.unresolved)} unresolved: {', '.join(report.unresolved)}")
    if report.ambiguous:
        shown = "; ".join(f"{k} -> {' | '.join(v)}" for k, v in report.ambiguous.items())
        parts.append(f"{len(report.ambiguous)} ambiguous: {shown}")
    raise MappingError(
        "dataset labels could not be mapped to concepts: "
        + "; ".join(parts)
        + " (add them to the mapping file as label,concept_id rows)"
    )
