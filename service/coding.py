"""Ontology concepts as codes for DICOM and FHIR: one :class:`ConceptCode` per finding.

A finding's concept is coded by the best public code its ontology gives it, so a PACS or an
EHR can read the finding without knowing kgdx's ontology:

1. a SNOMED CT cross-reference (``SNOMEDCT_US:60046008``): DICOM scheme ``SCT``, FHIR system
   ``http://snomed.info/sct`` (PS3.16 section 8, Table 8-1; FHIR "Using SNOMED CT");
2. else a UMLS CUI (``UMLS:C0032285``): DICOM scheme ``UMLS`` (OID 2.16.840.1.113883.6.86),
   FHIR system ``http://terminology.hl7.org/CodeSystem/umls`` (the preferred URI of HL7
   THO's UMLS NamingSystem, used by HL7's DICOM SR to FHIR mapping IG);
3. else the ontology's own id (``KGDX:0000042``): a *private* DICOM coding scheme,
   ``99`` + the id's prefix (``99KGDX``), because PS3.3 section 8.2 reserves designators
   that start with ``99`` for private and local schemes; the code value is the whole id so
   it maps back to the ontology unambiguously, and the scheme version is the ontology's
   content hash. FHIR system ``urn:kgdx:ontology:<prefix>``, version the same hash.

Example::

    coder = ConceptCoder.from_store(store, "chest-cxr@3f2a...")
    code = coder("KGDX:0000042", "Pneumonia")
    code.scheme, code.value         # ('SCT', '233604007')
    code.to_dicom()                 # highdicom.sr.CodedConcept
    code.to_fhir()                  # {'system': 'http://snomed.info/sct', 'code': ...}
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import highdicom as hd
from pydicom.sr.coding import Code

from kg.errors import KgError
from kg.ontology import Concept
from kg.store import GraphStore

__all__ = [
    "DCM_SYSTEM",
    "KGDX_SYSTEM_PREFIX",
    "LOINC_SYSTEM",
    "PRIVATE_SCHEME",
    "SNOMED_SYSTEM",
    "UCUM_SYSTEM",
    "UMLS_SYSTEM",
    "ConceptCode",
    "ConceptCoder",
    "ConceptCodes",
    "code_for_concept",
    "coder_for",
    "private_scheme",
    "resolve_code",
]

SNOMED_SYSTEM = "http://snomed.info/sct"
UMLS_SYSTEM = "http://terminology.hl7.org/CodeSystem/umls"
LOINC_SYSTEM = "http://loinc.org"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM_SYSTEM = "http://unitsofmeasure.org"
#: FHIR system of an ontology's own ids: this + the id prefix (``urn:kgdx:ontology:KGDX``).
KGDX_SYSTEM_PREFIX = "urn:kgdx:ontology:"
#: Private DICOM scheme of kgdx's own codes (and of ids without a prefix).
PRIVATE_SCHEME = "99KGDX"

#: DICOM designator -> FHIR system of the public schemes kgdx writes or reads back.
_SYSTEMS = {
    "SCT": SNOMED_SYSTEM,
    "UMLS": UMLS_SYSTEM,
    "LN": LOINC_SYSTEM,
    "DCM": DCM_SYSTEM,
    "UCUM": UCUM_SYSTEM,
}
_SNOMED_PREFIXES = ("SNOMEDCT", "SNOMED", "SCTID", "SCT")
_UMLS_PREFIXES = ("UMLS", "UMLS_CUI", "CUI")
_SNOMED_ID = re.compile(r"\d{6,18}")
_UMLS_CUI = re.compile(r"C\d{7}")
_MEANING_MAX = 64  # Code Meaning is LO: at most 64 characters
_DESIGNATOR_MAX = 16  # Coding Scheme Designator is SH: at most 16 characters


@dataclass(frozen=True)
class ConceptCode:
    """A finding's code, ready for DICOM (:meth:`to_dicom`) and FHIR (:meth:`to_fhir`).

    Args:
        value: the code in its scheme (``233604007``, ``C0032285``, ``KGDX:0000042``).
        scheme: DICOM Coding Scheme Designator (``SCT``, ``UMLS``, ``99KGDX``).
        meaning: human-readable meaning, the concept's label (cut to 64 characters).
        system: FHIR ``Coding.system`` URI of the scheme.
        scheme_version: scheme version where it matters (the ontology hash of private codes).
        concept_id: the ontology concept it codes.
        others: further public codes of the same concept (FHIR lists them as extra codings).
    """

    value: str
    scheme: str
    meaning: str
    system: str
    scheme_version: str | None = None
    concept_id: str = ""
    others: tuple[ConceptCode, ...] = field(default=(), compare=False)

    @property
    def private(self) -> bool:
        """Whether the scheme is a private (``99``...) one."""
        return self.scheme.startswith("99")

    def to_dicom(self) -> hd.sr.CodedConcept:
        """The DICOM coded concept (Code Value, Coding Scheme Designator, Code Meaning)."""
        return hd.sr.CodedConcept(
            self.value, self.scheme, self.meaning, scheme_version=self.scheme_version
        )

    def to_fhir(self) -> dict[str, str]:
        """The FHIR ``Coding`` as a dict."""
        coding = {"system": self.system, "code": self.value, "display": self.meaning}
        if self.scheme_version and self.private:
            coding["version"] = self.scheme_version
        return coding

    def fhir_codings(self) -> list[dict[str, str]]:
        """This code's ``Coding`` first, then those of :attr:`others`."""
        return [self.to_fhir(), *(o.to_fhir() for o in self.others)]


#: What the builders accept as the concept -> code lookup: a callable taking the concept id
#: (and, optionally, the label the result gave it), or a mapping by concept id; a value may
#: be a :class:`ConceptCode` or a highdicom / pydicom coded concept.
CodeLike: TypeAlias = ConceptCode | hd.sr.CodedConcept | Code
ConceptCodes: TypeAlias = Callable[..., CodeLike] | Mapping[str, CodeLike] | None


def private_scheme(concept_id: str) -> str:
    """The private DICOM Coding Scheme Designator for an ontology's own ids.

    ``"99"`` + the id's prefix in upper case, letters and digits only, at most 16 characters
    (``KGDX:0000042`` -> ``99KGDX``, ``HP:0002202`` -> ``99HP``); :data:`PRIVATE_SCHEME`
    when the id has no usable prefix.
    """
    prefix = _prefix(concept_id)
    return ("99" + prefix)[:_DESIGNATOR_MAX] if prefix else PRIVATE_SCHEME


def code_for_concept(
    concept: Concept | None,
    concept_id: str | None = None,
    label: str | None = None,
    *,
    ontology_version: str | None = None,
) -> ConceptCode:
    """The best code for an ontology concept: SNOMED CT, else UMLS, else its own id.

    Args:
        concept: the concept with its xrefs; None when only the id and label are known.
        concept_id: the concept's id (default ``concept.id``).
        label: the meaning (default the concept's label, else the id).
        ontology_version: the ontology's version, kept as the scheme version of own-id codes.

    Raises:
        ValueError: neither ``concept`` nor a non-empty ``concept_id`` is given.
    """
    cid = concept_id if concept_id is not None else (concept.id if concept else "")
    if not isinstance(cid, str) or not cid.strip():
        raise ValueError(f"concept_id must be a non-empty string, got {cid!r}")
    cid = cid.strip()
    meaning = _meaning(label or (concept.label if concept else "") or cid)
    snomed: list[ConceptCode] = []
    umls: list[ConceptCode] = []
    for xref in concept.xrefs if concept else ():
        prefix, _, local = xref.partition(":")
        prefix, local = prefix.strip().upper(), local.strip()
        if _is_snomed(prefix) and _SNOMED_ID.fullmatch(local):
            snomed.append(ConceptCode(local, "SCT", meaning, SNOMED_SYSTEM, concept_id=cid))
        elif prefix in _UMLS_PREFIXES and _UMLS_CUI.fullmatch(local):
            umls.append(ConceptCode(local, "UMLS", meaning, UMLS_SYSTEM, concept_id=cid))
    own = ConceptCode(
        cid,
        private_scheme(cid),
        meaning,
        KGDX_SYSTEM_PREFIX + (_prefix(cid) or "KGDX"),
        scheme_version=ontology_version or None,
        concept_id=cid,
    )
    ranked = _unique([*snomed, *umls, own])
    return ConceptCode(
        ranked[0].value,
        ranked[0].scheme,
        meaning,
        ranked[0].system,
        scheme_version=ranked[0].scheme_version,
        concept_id=cid,
        others=tuple(ranked[1:]),
    )


class ConceptCoder:
    """Concept id -> :class:`ConceptCode` from one ontology version, cached per concept.

    Safe to share between threads. A concept the lookup does not know is coded by its own
    id and the label the caller gives.

    Args:
        lookup: concept id -> the concept (with xrefs); may raise :class:`kg.errors.KgError`
            or return None for an unknown id.
        ontology_version: kept as the scheme version of own-id codes.
    """

    def __init__(
        self,
        lookup: Callable[[str], Concept | None],
        *,
        ontology_version: str | None = None,
    ):
        self._lookup = lookup
        self.ontology_version = ontology_version
        self._cache: dict[str, Concept | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_store(cls, store: GraphStore, ref: str | None) -> ConceptCoder:
        """A coder over ``store``'s ontology version ``ref`` (``name@version``)."""
        version = ref.partition("@")[2] if ref else ""
        return cls(lambda cid: store.concept(cid, ref), ontology_version=version or None)

    def concept(self, concept_id: str) -> Concept | None:
        """The concept, looked up once; None when the ontology does not have it."""
        with self._lock:
            if concept_id in self._cache:
                return self._cache[concept_id]
        try:
            found = self._lookup(concept_id)
        except KgError:
            found = None
        with self._lock:
            self._cache[concept_id] = found
        return found

    def __call__(self, concept_id: str, label: str | None = None) -> ConceptCode:
        concept = self.concept(concept_id)
        return code_for_concept(
            concept,
            concept_id,
            label if concept is None else (concept.label or label),
            ontology_version=self.ontology_version,
        )


def coder_for(
    store: GraphStore | None,
    payload: Mapping[str, Any],
    *,
    default_ref: str | None = None,
    cache: dict[Any, Any] | None = None,
) -> ConceptCoder | None:
    """The coder of the ontology version that produced a result ``payload``.

    The version is ``payload["ontology"]`` (``name@version``), else ``default_ref`` (the
    serving ontology, ``state.ontology_ref``). ``cache`` (e.g. a dict kept in
    ``state.extras``) keeps one coder per version, so each concept is looked up once per
    process. None when there is no store: findings are then coded by their own ids.
    """
    if store is None:
        return None
    onto = payload.get("ontology") if isinstance(payload, Mapping) else None
    onto = onto if isinstance(onto, Mapping) else {}
    name, version = str(onto.get("name") or ""), str(onto.get("version") or "")
    ref = f"{name}@{version}" if name and version else (default_ref or None)
    if cache is None:
        return ConceptCoder.from_store(store, ref)
    coder = cache.get(ref)
    if not isinstance(coder, ConceptCoder):
        coder = cache.setdefault(ref, ConceptCoder.from_store(store, ref))
    return coder


def resolve_code(
    concept_codes: ConceptCodes,
    concept_id: str,
    label: str | None = None,
    *,
    ontology_version: str | None = None,
) -> ConceptCode:
    """Look a finding's code up in ``concept_codes`` (callable, mapping or None).

    A callable is called with ``(concept_id, label)`` when it takes two arguments, else
    with ``concept_id``; a missing entry (``KeyError``, ``LookupError``, ``KgError`` or
    None) falls back to the concept's own id. A highdicom / pydicom coded concept is turned
    into a :class:`ConceptCode` (its FHIR system from the scheme designator).

    Raises:
        TypeError: ``concept_codes`` is neither callable, a mapping nor None, or gives
            something that is not a code.
    """
    found: object = None
    if concept_codes is None:
        found = None
    elif isinstance(concept_codes, Mapping):
        found = concept_codes.get(concept_id)
    elif callable(concept_codes):
        try:
            found = (
                concept_codes(concept_id, label)
                if _takes_label(concept_codes)
                else concept_codes(concept_id)
            )
        except (LookupError, KgError):
            found = None
    else:
        raise TypeError(
            "concept_codes must be a callable, a mapping or None, "
            f"got {type(concept_codes).__name__}"
        )
    if found is None:
        return code_for_concept(None, concept_id, label, ontology_version=ontology_version)
    return _as_concept_code(found, concept_id)


# -- helpers -------------------------------------------------------------------------------


def _as_concept_code(found: object, concept_id: str) -> ConceptCode:
    if isinstance(found, ConceptCode):
        return found
    if isinstance(found, hd.sr.CodedConcept | Code):
        scheme = str(found.scheme_designator)
        system = _SYSTEMS.get(scheme) or KGDX_SYSTEM_PREFIX + (_prefix(concept_id) or "KGDX")
        return ConceptCode(
            str(found.value),
            scheme,
            _meaning(str(found.meaning)),
            system,
            scheme_version=found.scheme_version or None,
            concept_id=concept_id,
        )
    raise TypeError(
        f"concept code for {concept_id!r} must be a ConceptCode or a coded concept, "
        f"got {type(found).__name__}"
    )


def _takes_label(fn: Callable[..., Any]) -> bool:
    if isinstance(fn, ConceptCoder):
        return True
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _is_snomed(prefix: str) -> bool:
    return any(prefix == p or prefix.startswith(p + "_") for p in _SNOMED_PREFIXES)


def _prefix(concept_id: str) -> str:
    prefix, sep, _ = concept_id.partition(":")
    if not sep:
        return ""
    return re.sub(r"[^A-Z0-9]", "", prefix.upper())


def _meaning(text: str) -> str:
    text = " ".join(str(text).split())  # no control characters or runs of spaces in LO
    text = text.replace("\\", "/")  # backslash separates values in DICOM strings
    return text if len(text) <= _MEANING_MAX else text[: _MEANING_MAX - 3] + "..."


def _unique(codes: Sequence[ConceptCode]) -> list[ConceptCode]:
    seen: set[tuple[str, str]] = set()
    out = []
    for c in codes:
        if (c.scheme, c.value) not in seen:
            seen.add((c.scheme, c.value))
            out.append(c)
    return out
