"""IRIs, CURIEs and relation names shared by the OWL, OBO Graphs JSON and OBO loaders.

OBO Foundry IRIs (``http://purl.obolibrary.org/obo/HP_0000118``) shorten to CURIEs
(``HP:0000118``); a few other well-known namespaces have a fixed prefix; anything else keeps
its full IRI, which is still a valid concept id. :func:`curie_to_iri` is the inverse used by
the exporters, and only returns an IRI when shortening it gives the CURIE back.
"""

from __future__ import annotations

import re

OBO_BASE = "http://purl.obolibrary.org/obo/"

#: IRI namespaces with a conventional prefix, checked longest first.
NAMESPACES: dict[str, str] = {
    "http://www.w3.org/2002/07/owl#": "owl",
    "http://www.w3.org/1999/02/22-rdf-syntax-ns#": "rdf",
    "http://www.w3.org/2000/01/rdf-schema#": "rdfs",
    "http://www.w3.org/2001/XMLSchema#": "xsd",
    "http://www.w3.org/2004/02/skos/core#": "skos",
    "http://www.geneontology.org/formats/oboInOwl#": "oboInOwl",
    "http://purl.org/dc/elements/1.1/": "dc",
    "http://purl.org/dc/terms/": "dcterms",
    "http://identifiers.org/umls/": "UMLS",
    "http://linkedlifedata.com/resource/umls/id/": "UMLS",
    "http://snomed.info/id/": "SNOMEDCT",
    "http://www.orpha.net/ORDO/Orphanet_": "Orphanet",
    "http://www.radlex.org/RID/": "RADLEX",
}
_PREFIX_IRI = {prefix: ns for ns, prefix in reversed(list(NAMESPACES.items()))}

#: Relation IRIs/CURIEs whose name is fixed by convention (RO and BFO identifiers).
KNOWN_PREDICATES: dict[str, str] = {
    "BFO:0000050": "part_of",
    "BFO:0000051": "has_part",
    "RO:0001025": "located_in",
    "RO:0001015": "location_of",
    "RO:0002200": "has_phenotype",
    "RO:0002202": "develops_from",
    "RO:0002211": "regulates",
    "RO:0002573": "has_modifier",
    "RO:0000052": "inheres_in",
    "RO:0002314": "inheres_in_part_of",
    "RO:0002131": "overlaps",
    "RO:0002610": "correlated_with",
    "rdfs:subClassOf": "is_a",
}
#: The reverse map the exporters use, so ``part_of`` is written as ``BFO:0000050``.
PREDICATE_IDS: dict[str, str] = {
    name: curie for curie, name in KNOWN_PREDICATES.items() if name != "is_a"
}

_OBO_LOCAL = re.compile(r"([A-Za-z][A-Za-z0-9.-]*)_([A-Za-z0-9][^/#?\s]*)\Z")
_CURIE = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*):([^\s/#?:][^\s#?]*)\Z")
_IRI_SCHEMES = ("http://", "https://", "urn:", "ftp://", "file:")


def is_iri(value: str) -> bool:
    """Whether ``value`` is written as a full IRI rather than a CURIE or bare name."""
    return value.startswith(_IRI_SCHEMES)


def iri_to_curie(iri: str) -> str:
    """Shorten an IRI to a CURIE where a convention exists; return other values unchanged.

    ``http://purl.obolibrary.org/obo/HP_0000118`` -> ``HP:0000118``;
    ``http://www.geneontology.org/formats/oboInOwl#hasDbXref`` -> ``oboInOwl:hasDbXref``;
    ``https://example.org/x`` -> ``https://example.org/x``; ``HP:1`` -> ``HP:1``.
    """
    if not is_iri(iri):
        return iri
    if iri.startswith(OBO_BASE):
        m = _OBO_LOCAL.match(iri, len(OBO_BASE))
        if m:
            return f"{m.group(1)}:{m.group(2)}"
        return iri
    for ns, prefix in NAMESPACES.items():
        if iri.startswith(ns) and len(iri) > len(ns):
            return f"{prefix}:{iri[len(ns) :]}"
    return iri


def curie_to_iri(curie: str) -> str:
    """Expand a CURIE to an IRI when the expansion shortens back to it; else return it as is."""
    if is_iri(curie):
        return curie
    m = _CURIE.match(curie)
    if not m:
        return curie
    prefix, local = m.groups()
    ns = _PREFIX_IRI.get(prefix)
    iri = f"{ns}{local}" if ns else f"{OBO_BASE}{prefix}_{local}"
    return iri if iri_to_curie(iri) == curie else curie


def local_name(iri: str) -> str:
    """The last path or fragment segment of an IRI (``.../core#broader`` -> ``broader``)."""
    cut = max(iri.rfind("#"), iri.rfind("/"))
    return iri[cut + 1 :] if cut >= 0 and cut + 1 < len(iri) else iri


def relation_name(label: str) -> str:
    """A relation label as a predicate name: ``"part of"`` -> ``part_of``."""
    return "_".join(label.split())


def predicate_name(pred: str, labels: dict[str, str] | None = None) -> str:
    """Name a relation from its IRI, CURIE or bare name.

    Known RO/BFO ids map to their conventional names (``BFO:0000050`` -> ``part_of``);
    otherwise the property's label (``labels`` maps CURIEs to labels) with spaces as
    underscores; otherwise the CURIE's or IRI's local name. Bare names pass unchanged.
    """
    if pred in ("is_a", "subClassOf"):
        return "is_a"
    curie = iri_to_curie(pred)
    if ":" not in curie:
        return curie
    known = KNOWN_PREDICATES.get(curie)
    if known:
        return known
    if labels:
        label = labels.get(curie)
        if label:
            return relation_name(label)
    if is_iri(curie):
        return local_name(curie)
    local = curie.split(":", 1)[1]
    # An opaque numeric id (RO:0002999) says nothing; keep the whole CURIE then.
    return curie if local.isdigit() else local
