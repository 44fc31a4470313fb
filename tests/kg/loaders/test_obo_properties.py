"""Properties of the OBO loader (:mod:`kg.loaders.obo` through :func:`kg.loaders.load_ontology`).

Generated OBO documents (random CURIEs, names, definitions and synonyms in any Unicode with
OBO's escapes, xrefs, ``is_a`` lines forming a DAG, ``relationship`` lines with and without
``{weight=..., source=...}`` qualifiers, trailing ``! comments``, CRLF line ends) load back
to exactly their concepts and relations. Arbitrary text, arbitrary bytes, and generated
documents with lines dropped, repeated or cut, either load or raise :class:`kg.errors.KgError`
(the domain error the CLI and the service report), never another exception.

Each property runs a bounded, derandomized number of examples (a few seconds each).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kg.errors import KgError
from kg.loaders import load_ontology
from kg.ontology import Concept, Ontology, Relation

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- generating OBO documents --------------------------------------------------------------------

prefixes = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8
).filter(lambda p: p[0] != "_")
curies = st.builds(lambda p, n: f"{p}:{n:07d}", prefixes, st.integers(0, 9_999_999))
predicates = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=16).filter(
    lambda p: p != "is_a" and p.strip("_")
)
# Any Unicode text on one line. OBO reads lines split at "\n" only; the surrounding blanks
# of a value are not part of it.
texts = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\n\r\x00")
    # OBO's special characters, often: escapes, comments, qualifiers, quotes, blanks.
    | st.sampled_from(list('\\!{}"\t :[]=,nW')),
    max_size=30,
)


def escape_value(text: str) -> str:
    r"""An unquoted OBO value (``name:``): ``\``, ``!`` and ``{`` escaped."""
    return text.replace("\\", "\\\\").replace("!", "\\!").replace("{", "\\{")


def escape_quoted(text: str) -> str:
    r"""The inside of an OBO quoted string (``def:``, ``synonym:``)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


@dataclass
class Term:
    id: str
    name: str
    definition: str = ""
    synonyms: list[str] = field(default_factory=list)
    xrefs: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    # (predicate, target, weight, source)
    relationships: list[tuple[str, str, float | None, str]] = field(default_factory=list)


@dataclass
class Document:
    terms: list[Term]
    text: str
    name: str


@st.composite
def documents(draw: st.DrawFn) -> Document:
    ids = draw(st.lists(curies, min_size=1, max_size=8, unique=True))
    terms: list[Term] = []
    for i, cid in enumerate(ids):
        terms.append(
            Term(
                id=cid,
                name=draw(texts),
                definition=draw(texts),
                synonyms=draw(st.lists(texts, max_size=3)),
                xrefs=draw(st.lists(curies, max_size=2)),
                # is_a only to earlier terms: a DAG, so the document validates.
                parents=draw(st.lists(st.sampled_from(ids[:i]), max_size=2, unique=True))
                if i
                else [],
                relationships=draw(
                    st.lists(
                        st.tuples(
                            predicates,
                            st.sampled_from(ids),
                            st.none() | st.sampled_from([0.05, 0.31, 0.5, 1.0]),
                            st.sampled_from(["", "NIH", "expert review"]),
                        ),
                        max_size=3,
                    )
                ),
            )
        )
    name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    comment = draw(st.sampled_from(["", " ! a comment", " ! {not a qualifier}"]))
    lines = ["format-version: 1.4", f"ontology: {name}", ""]
    for t in terms:
        lines += ["[Term]", f"id: {t.id}", f"name: {escape_value(t.name)}"]
        if t.definition.strip():
            lines.append(f'def: "{escape_quoted(t.definition)}" [PMID:1, ISBN:2]')
        for s in t.synonyms:
            lines.append(f'synonym: "{escape_quoted(s)}" EXACT []')
        lines += [f"xref: {x}" for x in t.xrefs]
        lines += [f"is_a: {p}{comment}" for p in t.parents]
        for pred, target, weight, source in t.relationships:
            quals = []
            if weight is not None:
                quals.append(f'weight="{weight}"')
            if source:
                quals.append(f'source="{source}"')
            qualifiers = " {" + ", ".join(quals) + "}" if quals else ""
            lines.append(f"relationship: {pred} {target}{qualifiers}{comment}")
        lines.append("")
    lines += ["[Typedef]", "id: part_of", "name: part of", ""]
    return Document(terms, eol.join(lines), name)


def expected_concepts(doc: Document) -> dict[str, Concept]:
    return {
        t.id: Concept(
            t.id,
            t.name.strip(),
            tuple(dict.fromkeys(t.synonyms)),
            t.definition if t.definition.strip() else "",
            tuple(dict.fromkeys(t.xrefs)),
        )
        for t in doc.terms
    }


def expected_relations(doc: Document) -> list[Relation]:
    out = []
    for t in doc.terms:
        out += [Relation(t.id, "is_a", p) for p in t.parents]
        out += [Relation(t.id, p, o, w, s) for p, o, w, s in t.relationships]
    return sorted(out, key=repr)


def load_text(text: str | bytes, suffix: str = ".obo") -> Ontology:
    """``load_ontology`` of a file holding ``text`` (hypothesis and pytest's ``tmp_path``
    do not mix, so each example writes its own temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"doc{suffix}"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8", newline="")
        return load_ontology(path)


# -- round trip ------------------------------------------------------------------------------------


@PROPERTY
@given(documents())
def test_generated_documents_load_their_concepts_and_relations(doc: Document) -> None:
    onto = load_text(doc.text)
    assert onto.name == doc.name
    assert onto.meta["format"] == "obo" and onto.meta["format-version"] == "1.4"
    assert onto.concepts == expected_concepts(doc)
    assert sorted(onto.relations, key=repr) == expected_relations(doc)


# -- anything else: loads, or a KgError ------------------------------------------------------------


def load_or_kg_error(text: str | bytes, suffix: str = ".obo") -> Ontology | None:
    try:
        onto = load_text(text, suffix)
    except KgError:
        return None
    # What loads is consistent: relations join defined concepts.
    for r in onto.relations:
        assert r.subject in onto.concepts and r.object in onto.concepts
    return onto


_OBO_LINES = st.sampled_from(
    [
        "[Term]",
        "[Typedef]",
        "[Instance]",
        "[Term",
        "[]",
        "id: A:1",
        "id: A:2",
        "id:",
        "id: A:1 B:2",
        "name: x",
        "name: \\",
        'def: "unterminated',
        'def: "x" [',
        'def: x"',
        'synonym: "a\\" EXACT []',
        "synonym: x",
        "is_a: A:1",
        "is_a: A:2 ! c",
        "is_a:",
        "is_a: A:1 {weight=2}",
        "is_a: A:1 {weight=nan}",
        'is_a: A:1 {weight="0.5", source="x}',
        "is_a: A:1 {",
        "relationship: part_of A:2",
        "relationship: part_of",
        "relationship: BFO:0000050 A:1",
        'relationship: r A:1 {weight="0", source=x}',
        'relationship: r A:1 {weight="1e309"}',
        "relationship: r A:1 {=}",
        "is_obsolete: true",
        "replaced_by: A:2",
        'xref: X:1 "desc"',
        "format-version: 1.2",
        "ontology: x.obo",
        "tag without colon",
        ": value",
        "bad tag: v",
        "! comment",
        "",
    ]
)


@PROPERTY
@given(st.lists(_OBO_LINES | texts, max_size=20), st.sampled_from(["\n", "\r\n", "\r"]))
@example(["[Term]", "id: A:1", "is_a: A:1 {weight=nan}"], "\n")
@example(["[Term]", "id: A:1", 'relationship: r A:1 {weight="1e309"}'], "\n")
def test_obo_like_lines_load_or_raise_a_kg_error(lines: list[str], eol: str) -> None:
    load_or_kg_error(eol.join(lines))


#: Starts that steer a file without an extension to each format's parser.
_SNIFFED = [
    "",
    "format-version: 1.4\n",
    "[Term]\n",
    "<",
    "<?xml version='1.0'?>\n<rdf:RDF",
    "{",
    '{"graphs": [',
    "subject,predicate,object\n",
]


@PROPERTY
@given(
    st.sampled_from(_SNIFFED),
    st.text(max_size=300) | st.binary(max_size=300),
    st.sampled_from([".obo", ""]),
)
@example("", "\ufeff[Term]\nid: A:1\n", ".obo")
@example("", b"\xef\xbb\xbf", ".obo")
def test_arbitrary_text_loads_or_raises_a_kg_error(
    start: str, text: str | bytes, suffix: str
) -> None:
    data = start.encode() + text if isinstance(text, bytes) else start + text
    load_or_kg_error(data, suffix)


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    """A generated document with some lines dropped, repeated or cut short."""
    lines = draw(documents()).text.split("\n")
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["drop", "repeat", "cut"]))
        if how == "drop":
            del lines[at]
        elif how == "repeat":
            lines.insert(at, lines[at])
        else:
            lines[at] = lines[at][: draw(st.integers(0, len(lines[at])))]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@PROPERTY
@given(mutated_documents())
def test_mutated_documents_load_or_raise_a_kg_error(text: str) -> None:
    load_or_kg_error(text)


def test_the_generator_makes_every_kind_of_line() -> None:
    """The round trip above is only as good as its documents: they use every feature."""
    seen: set[str] = set()

    @settings(PROPERTY, max_examples=50)
    @given(documents())
    def collect(doc: Document) -> None:
        seen.update(
            tag
            for line in doc.text.splitlines()
            for tag in [line.split(":", 1)[0]]
            if ":" in line and not line.startswith("[")
        )
        if "{" in doc.text.replace("\\{", ""):
            seen.add("qualifiers")

    collect()
    assert {"id", "name", "def", "synonym", "xref", "is_a", "relationship", "qualifiers"} <= seen
