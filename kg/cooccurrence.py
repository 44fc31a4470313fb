"""How often the NIH ChestX-ray14 findings appear together, as ``co_occurs_with`` knowledge.

From the label sets of all 112,120 NIH images (``Data_Entry_2017_v2020.csv.gz``, column
``Finding Labels``, ``|``-separated) this module counts, for every ordered pair of the 14
findings, the images labelled with both, and turns them into the conditional probability
``P(B | A) = n(A and B) / n(A)``. :func:`main` writes the pairs that are frequent enough back
into the bundled OBO file as::

    relationship: co_occurs_with KGDX:0000110 {weight="0.283", source="NIH ChestX-ray14",
        support="3275"} ! Pleural effusion

(one line in the file), replacing only the ``co_occurs_with`` lines with that ``source`` in
the 14 finding stanzas, so running it twice changes nothing. The labels were mined from
reports by NLP (Wang et al., CVPR 2017), so the weights describe how radiologists' reports
co-mention findings.

Run ``python -m kg.cooccurrence --help``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kg.errors import KgError, OntologyFormatError
from kg.mapping import CHEST_CXR_OBO, NIH_LABEL_MAP, map_labels, require_all

__all__ = [
    "DEFAULT_DATA",
    "NIH_FINDINGS",
    "NIH_SOURCE",
    "CooccurrenceEdge",
    "CooccurrenceTable",
    "compute_cooccurrence",
    "count_cooccurrence",
    "main",
    "read_finding_labels",
    "rewrite_obo",
]

#: The 14 findings of NIH ChestX-ray14, spelled as in its label files.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
#: The label of an image without any of the 14 findings.
NO_FINDING = "No Finding"
#: Provenance tag written on the edges and used to find them again.
NIH_SOURCE = "NIH ChestX-ray14"
#: The shared NIH label table, relative to the repository root.
DEFAULT_DATA = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "nih_metadata"
    / "Data_Entry_2017_v2020.csv.gz"
)
LABEL_COLUMN = "Finding Labels"


@dataclass(frozen=True)
class CooccurrenceEdge:
    """``subject -co_occurs_with-> object`` with ``probability = P(object | subject)``."""

    subject: str
    object: str
    probability: float
    support: int


@dataclass
class CooccurrenceTable:
    """Image counts of findings and finding pairs.

    Attributes:
        findings: finding names, the order of the axes below.
        n_images: images read (with or without findings).
        joint: ``joint[i, j]`` = images labelled with both finding i and finding j; the
            diagonal is the number of images with finding i. Shape (K, K), int64.
        other_labels: labels outside ``findings`` (``No Finding`` excluded) and their counts.
    """

    findings: tuple[str, ...]
    n_images: int
    joint: np.ndarray
    other_labels: dict[str, int]

    @property
    def counts(self) -> np.ndarray:
        """Images with each finding, shape (K,)."""
        return np.diag(self.joint).copy()

    def conditional(self) -> np.ndarray:
        """``P[i, j] = P(finding j | finding i)``, shape (K, K); 0 where finding i is absent."""
        counts = self.counts.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = self.joint / counts[:, None]
        p[counts == 0, :] = 0.0
        return p

    def probability(self, given: str, target: str) -> float:
        """``P(target | given)``."""
        i, j = self._index(given), self._index(target)
        return float(self.conditional()[i, j])

    def edges(self, min_prob: float = 0.05, min_support: int = 20) -> list[CooccurrenceEdge]:
        """Ordered pairs (A, B), A != B, with ``P(B | A) >= min_prob`` and at least
        ``min_support`` images carrying both; sorted by subject order, then by falling
        probability, then by object order.

        Raises:
            ValueError: ``min_prob`` outside [0, 1] or ``min_support`` below 1.
        """
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob!r}")
        if min_support < 1:
            raise ValueError(f"min_support must be >= 1, got {min_support!r}")
        p = self.conditional()
        out: list[CooccurrenceEdge] = []
        k = len(self.findings)
        for i in range(k):
            row = [
                j
                for j in range(k)
                if j != i and self.joint[i, j] >= min_support and p[i, j] >= min_prob
            ]
            row.sort(key=lambda j: (-p[i, j], j))
            out.extend(
                CooccurrenceEdge(
                    self.findings[i], self.findings[j], float(p[i, j]), int(self.joint[i, j])
                )
                for j in row
            )
        return out

    def format_table(self) -> str:
        """The matrix ``P(column | row)`` as text, with each row's image count."""
        p = self.conditional()
        short = [f[:6] for f in self.findings]
        width = max(len(f) for f in self.findings)
        lines = [
            f"P(column | row) over {self.n_images} images",
            " " * width + "       n  " + " ".join(f"{s:>6}" for s in short),
        ]
        for i, f in enumerate(self.findings):
            cells = " ".join("     -" if i == j else f"{p[i, j]:6.3f}" for j in range(len(short)))
            lines.append(f"{f:<{width}} {int(self.joint[i, i]):7d}  {cells}")
        return "\n".join(lines)

    def _index(self, finding: str) -> int:
        try:
            return self.findings.index(finding)
        except ValueError:
            raise KeyError(
                f"unknown finding {finding!r}; expected one of {self.findings}"
            ) from None


def read_finding_labels(path: str | Path, column: str = LABEL_COLUMN) -> Iterator[list[str]]:
    """Yield each row's labels from a CSV (plain or ``.gz``) with a ``|``-separated column.

    Raises:
        KgError: the file is missing or lacks ``column``.
    """
    path = Path(path)
    if not path.is_file():
        raise KgError(f"NIH label file not found: {path}")
    with (
        gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text,
    ):
        reader = csv.DictReader(text)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise KgError(f"{path}: no {column!r} column (columns: {reader.fieldnames or []})")
        for row in reader:
            cell = row[column] or ""
            yield [s.strip() for s in cell.split("|") if s.strip()]


def count_cooccurrence(
    label_sets: Iterable[Iterable[str]], findings: Sequence[str] = NIH_FINDINGS
) -> CooccurrenceTable:
    """Count single and pairwise occurrences of ``findings`` over images.

    Args:
        label_sets: one iterable of labels per image; a label repeated within an image
            counts once.
        findings: the findings to count; other labels (except ``No Finding``) are tallied
            in :attr:`CooccurrenceTable.other_labels`.
    """
    findings = tuple(findings)
    index = {f: i for i, f in enumerate(findings)}
    joint = np.zeros((len(findings), len(findings)), dtype=np.int64)
    other: dict[str, int] = {}
    n = 0
    for labels in label_sets:
        n += 1
        present: set[int] = set()
        for label in labels:
            i = index.get(label)
            if i is not None:
                present.add(i)
            elif label != NO_FINDING:
                other[label] = other.get(label, 0) + 1
        if present:
            idx = np.fromiter(sorted(present), dtype=np.int64)
            joint[np.ix_(idx, idx)] += 1
    return CooccurrenceTable(findings, n, joint, other)


def compute_cooccurrence(path: str | Path = DEFAULT_DATA) -> CooccurrenceTable:
    """:func:`count_cooccurrence` over the NIH label file at ``path``."""
    return count_cooccurrence(read_finding_labels(path))


_ID_LINE = re.compile(r"^id:\s*(\S+)")
_NAME_LINE = re.compile(r"^name:\s*(.*?)\s*$")
_SOURCE_QUAL = re.compile(r'\bsource\s*=\s*"((?:[^"\\]|\\.)*)"')


def _format_weight(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.3g}"


def rewrite_obo(
    path: str | Path,
    edges: Iterable[CooccurrenceEdge],
    ids: Mapping[str, str],
    *,
    source: str = NIH_SOURCE,
) -> bool:
    """Replace the ``co_occurs_with`` lines tagged ``source`` in the subjects' stanzas.

    Args:
        path: OBO file, rewritten in place (atomically) when its text changes.
        edges: the edges to write, in the order they should appear.
        ids: finding name -> concept id, for every subject and object of ``edges`` and for
            every finding whose old lines should go (a finding without edges loses them).
        source: the provenance tag; lines with another ``source`` are left alone.

    Returns:
        Whether the file changed.

    Raises:
        OntologyFormatError: a needed id has no ``[Term]`` stanza in the file.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    names: dict[str, str] = {}
    stanzas: dict[str, tuple[int, int]] = {}  # id -> [start, end) line range of its stanza
    start = -1
    current: str | None = None
    in_term = False
    for n, line in enumerate([*lines, "[End]"]):
        if line.startswith("["):
            if current is not None:
                stanzas[current] = (start, n)
            start, current = n, None
            in_term = line.strip() == "[Term]"
            continue
        if start >= 0 and in_term:
            m = _ID_LINE.match(line)
            if m and current is None:
                current = m.group(1)
            m = _NAME_LINE.match(line)
            if m and current is not None:
                names.setdefault(current, m.group(1))

    new_lines: dict[str, list[str]] = {cid: [] for cid in ids.values()}
    for e in edges:
        s, o = ids[e.subject], ids[e.object]
        new_lines.setdefault(s, []).append(
            f'relationship: co_occurs_with {o} {{weight="{_format_weight(e.probability)}", '
            f'source="{source}", support="{e.support}"}} ! {names.get(o, e.object)}'
        )
    missing = sorted(c for c in new_lines if c not in stanzas)
    if missing:
        raise OntologyFormatError(
            f"no [Term] stanza for {', '.join(missing)}; cannot write co_occurs_with lines",
            path=str(path),
        )

    # Edit from the bottom up so earlier line numbers stay valid.
    for cid in sorted(new_lines, key=lambda c: stanzas[c][0], reverse=True):
        a, b = stanzas[cid]
        body = [ln for ln in lines[a:b] if not _is_ours(ln, source)]
        end = len(body)
        while end > 0 and not body[end - 1].strip():
            end -= 1
        lines[a:b] = body[:end] + new_lines[cid] + body[end:]
    new_text = "\n".join(lines)
    if new_text == text:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(new_text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _is_ours(line: str, source: str) -> bool:
    if not line.startswith("relationship:"):
        return False
    value = line[len("relationship:") :].split()
    if not value or value[0] != "co_occurs_with":
        return False
    m = _SOURCE_QUAL.search(line)
    return m is not None and m.group(1) == source


def _finding_ids(obo: Path, label_map: Path) -> dict[str, str]:
    from kg.loaders import load_ontology  # deferred: loading pulls in every parser

    report = require_all(map_labels(NIH_FINDINGS, load_ontology(obo), label_map))
    return dict(report.resolved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kg.cooccurrence",
        description=(
            "Compute P(B | A) for the 14 NIH ChestX-ray14 findings and optionally write them "
            "as co_occurs_with edges into an OBO file. Example: python -m kg.cooccurrence "
            "--write kg/data/chest_cxr.obo"
        ),
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="NIH Data_Entry CSV(.gz) (default: %(default)s)",
    )
    parser.add_argument(
        "--min-prob",
        type=float,
        default=0.05,
        help="keep edges with P(B | A) >= this (default: %(default)s)",
    )
    parser.add_argument(
        "--min-support",
        type=int,
        default=20,
        help="keep edges seen on at least this many images (default: %(default)s)",
    )
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=CHEST_CXR_OBO,
        default=None,
        metavar="OBO",
        help=f"rewrite the co_occurs_with lines of OBO "
        f"(default when given without a path: {CHEST_CXR_OBO})",
    )
    parser.add_argument(
        "--label-map",
        type=Path,
        default=NIH_LABEL_MAP,
        help="label,concept_id CSV naming the finding concepts in OBO (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_prob <= 1.0:
        parser.error(f"--min-prob must be in [0, 1], got {args.min_prob}")
    if args.min_support < 1:
        parser.error(f"--min-support must be >= 1, got {args.min_support}")
    try:
        table = compute_cooccurrence(args.data)
        edges = table.edges(args.min_prob, args.min_support)
        print(table.format_table())
        print(f"\n{len(edges)} edges with P >= {args.min_prob} and support >= {args.min_support}")
        if table.other_labels:
            print(f"labels outside the 14 findings: {table.other_labels}", file=sys.stderr)
        if args.write is not None:
            changed = rewrite_obo(args.write, edges, _finding_ids(args.write, args.label_map))
            print(f"{args.write}: {'updated' if changed else 'unchanged'}")
    except KgError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
