"""A streaming loader for OWL ontologies in RDF/XML, the format OBO Foundry publishes.

The XML goes through ``defusedxml`` with DTDs forbidden: a document type declaration, an
entity declaration or an external entity is refused before anything is expanded, so an
entity bomb or an ``file:///etc/passwd`` entity fails at once and in bounded memory. (OWL
files written with ``<!ENTITY owl "...">`` shorthands must be re-saved without a DTD, e.g.
with ``robot convert``.) The document is read with ``iterparse`` and every top-level
element is dropped once read, so memory holds the ontology, not the XML tree.

Mapped: ``owl:Class`` (IRI -> CURIE), ``rdfs:label``, ``IAO:0000115`` definitions,
``oboInOwl:has{Exact,Related,Broad,Narrow}Synonym``, ``oboInOwl:hasDbXref``,
``owl:deprecated``, ``IAO:0100001`` (replaced by), ``rdfs:subClassOf`` a named class
(``is_a``) or an ``owl:Restriction`` with ``owl:onProperty`` and ``owl:someValuesFrom``
(a relation named after the property). Other axioms are skipped.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element, ParseError, TreeBuilder

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, iterparse

from kg.errors import OntologyFormatError
from kg.loaders.iri import iri_to_curie, predicate_name
from kg.loaders.textfile import Progress, ProgressReader, check_bytes, check_file
from kg.ontology import Concept, Ontology, Relation

RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
RDFS = "{http://www.w3.org/2000/01/rdf-schema#}"
OWL = "{http://www.w3.org/2002/07/owl#}"
OBO = "{http://purl.obolibrary.org/obo/}"
OBO_IN_OWL = "{http://www.geneontology.org/formats/oboInOwl#}"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

ABOUT = RDF + "about"
RESOURCE = RDF + "resource"
OWL_THING = "http://www.w3.org/2002/07/owl#Thing"
SYNONYM_TAGS = frozenset(
    OBO_IN_OWL + t
    for t in ("hasExactSynonym", "hasRelatedSynonym", "hasBroadSynonym", "hasNarrowSynonym")
)
_TYPE_CLASS = "http://www.w3.org/2002/07/owl#Class"
_TYPE_OBJECT_PROPERTY = "http://www.w3.org/2002/07/owl#ObjectProperty"


class _Draft:
    """Fields of one class while the document is read (a class may be described twice)."""

    __slots__ = ("definition", "deprecated", "edges", "labels", "replaced_by", "synonyms", "xrefs")

    def __init__(self) -> None:
        self.labels: list[tuple[str, str]] = []  # (language, text)
        self.definition = ""
        self.synonyms: list[str] = []
        self.xrefs: list[str] = []
        self.deprecated = False
        self.replaced_by: list[str] = []
        self.edges: list[tuple[str, str]] = []  # (property IRI or "is_a", target IRI)


def parse_owl(
    path: str | Path, *, name: str | None = None, progress: Progress | None = None
) -> Ontology:
    """Parse an OWL RDF/XML file into an :class:`Ontology` (not yet validated).

    Raises:
        OntologyFormatError: not RDF/XML, malformed XML (with line number), a DTD or
            entity declaration, an empty or binary file.
    """
    path = Path(path)
    where = str(path)
    total = check_file(path)
    with path.open("rb") as f:
        head = f.read(65536)
    if b"\x00" in head:
        check_bytes(head, path)  # raises: binary data

    drafts: dict[str, _Draft] = {}
    prop_labels: dict[str, str] = {}  # property CURIE -> label (shorthand preferred)
    meta: dict[str, str] = {"format": "owl", "source": path.name}

    builder = TreeBuilder()
    parser = DefusedXMLParser(target=builder, forbid_dtd=True)
    try:
        with path.open("rb") as raw:
            reader = ProgressReader(raw, total, progress)
            depth = 0
            root: Element | None = None
            for event, elem in iterparse(reader, events=("start", "end"), parser=parser):
                if event == "start":
                    depth += 1
                    if root is None:
                        root = elem
                        if elem.tag != RDF + "RDF":
                            raise OntologyFormatError(
                                f"not OWL in RDF/XML: root element is {_short(elem.tag)}, "
                                "expected rdf:RDF (convert OWL/XML or Turtle with "
                                "'robot convert --format owl')",
                                path=where,
                                line=_line(parser),
                            )
                    continue
                depth -= 1
                if depth != 1:
                    continue
                _read_top_element(elem, drafts, prop_labels, meta)
                assert root is not None
                root.clear()  # drop what has been read; keeps memory flat
    except DefusedXmlException as e:
        raise OntologyFormatError(
            f"refused: the XML declares a DTD or entities ({type(e).__name__}); "
            "entity expansion is not allowed in ontology files",
            path=where,
            line=_line(parser),
        ) from None
    except ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else None
        msg = str(e).split(": line")[0]
        raise OntologyFormatError(f"malformed XML: {msg}", path=where, line=line) from None

    concepts: dict[str, Concept] = {}
    relations: list[Relation] = []
    for iri, d in drafts.items():
        cid = iri_to_curie(iri)
        concepts[cid] = Concept(
            cid,
            _best_label(d.labels),
            tuple(dict.fromkeys(d.synonyms)),
            d.definition,
            tuple(dict.fromkeys(d.xrefs)),
            d.deprecated,
            tuple(dict.fromkeys(d.replaced_by)),
        )
    for iri, d in drafts.items():
        cid = iri_to_curie(iri)
        for prop, target in d.edges:
            pred = "is_a" if prop == "is_a" else predicate_name(prop, prop_labels)
            relations.append(Relation(cid, pred, iri_to_curie(target)))
    return Ontology(name=name or path.stem, concepts=concepts, relations=relations, meta=meta)


def _line(parser: DefusedXMLParser) -> int | None:
    expat = getattr(parser, "parser", None)
    return getattr(expat, "CurrentLineNumber", None)


def _short(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _rdf_types(elem: Element) -> set[str]:
    return {c.get(RESOURCE, "") for c in elem if c.tag == RDF + "type"}


def _read_top_element(
    elem: Element,
    drafts: dict[str, _Draft],
    prop_labels: dict[str, str],
    meta: dict[str, str],
) -> None:
    tag = elem.tag
    if tag == RDF + "Description":
        types = _rdf_types(elem)
        if _TYPE_CLASS in types:
            tag = OWL + "Class"
        elif _TYPE_OBJECT_PROPERTY in types:
            tag = OWL + "ObjectProperty"
    if tag == OWL + "Class":
        about = elem.get(ABOUT)
        if about:
            draft = drafts.get(about)
            if draft is None:
                draft = drafts[about] = _Draft()
            _read_class(elem, draft)
    elif tag == OWL + "ObjectProperty":
        about = elem.get(ABOUT)
        if about:
            _read_property(elem, iri_to_curie(about), prop_labels)
    elif tag == OWL + "Ontology":
        for child in elem:
            if child.tag == OWL + "versionIRI" and child.get(RESOURCE):
                meta["data-version"] = child.get(RESOURCE, "")
            elif child.tag == OWL + "versionInfo" and child.text and "data-version" not in meta:
                meta["data-version"] = child.text.strip()
        if elem.get(ABOUT):
            meta["ontology-iri"] = elem.get(ABOUT, "")


def _text(elem: Element) -> str:
    return (elem.text or "").strip()


def _read_class(elem: Element, d: _Draft) -> None:
    for child in elem:
        tag = child.tag
        if tag == RDFS + "label":
            d.labels.append((child.get(XML_LANG, ""), _text(child)))
        elif tag in SYNONYM_TAGS:
            d.synonyms.append(_text(child))
        elif tag == OBO_IN_OWL + "hasDbXref":
            if _text(child):
                d.xrefs.append(_text(child))
        elif tag == OBO + "IAO_0000115":
            d.definition = d.definition or _text(child)
        elif tag == OWL + "deprecated":
            d.deprecated = _text(child).lower() in ("true", "1")
        elif tag == OBO + "IAO_0100001":
            target = child.get(RESOURCE) or _text(child)
            if target:
                d.replaced_by.append(iri_to_curie(target))
        elif tag == RDFS + "subClassOf":
            _read_superclass(child, d)


def _read_superclass(sub: Element, d: _Draft) -> None:
    """``rdfs:subClassOf`` a named class or an existential restriction."""
    target = sub.get(RESOURCE)
    if target:
        if target != OWL_THING:
            d.edges.append(("is_a", target))
        return
    for expr in sub:
        if expr.tag == OWL + "Class" and expr.get(ABOUT):
            if expr.get(ABOUT) != OWL_THING:
                d.edges.append(("is_a", expr.get(ABOUT, "")))
        elif expr.tag == OWL + "Restriction":
            prop = filler = None
            for part in expr:
                if part.tag == OWL + "onProperty":
                    prop = part.get(RESOURCE) or _about_of_child(part)
                elif part.tag == OWL + "someValuesFrom":
                    filler = part.get(RESOURCE) or _about_of_child(part)
            if prop and filler:
                d.edges.append((prop, filler))


def _about_of_child(elem: Element) -> str | None:
    for child in elem:
        about = child.get(ABOUT)
        if about:
            return about
    return None


def _read_property(elem: Element, curie: str, prop_labels: dict[str, str]) -> None:
    label = shorthand = ""
    for child in elem:
        if child.tag == RDFS + "label" and child.get(XML_LANG, "en") == "en" and not label:
            label = _text(child)
        elif child.tag == OBO_IN_OWL + "shorthand":
            shorthand = _text(child)
    if shorthand or label:
        prop_labels[curie] = shorthand or label


def _best_label(labels: list[tuple[str, str]]) -> str:
    """The label without a language tag, else the English one, else the first."""
    for want in ("", "en"):
        for lang, text in labels:
            if lang == want or (want == "en" and lang.lower().startswith("en")):
                return text
    return labels[0][1] if labels else ""
