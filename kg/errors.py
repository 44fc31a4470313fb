"""Domain errors of the ontology layer.

Every error a user can cause derives from :class:`KgError`; the CLI prints its message as
``Error: ...`` and the service maps it to an HTTP status in one handler module.
"""

from __future__ import annotations


class KgError(Exception):
    """Base class of every error raised by ``kg``."""


class OntologyFormatError(KgError):
    """A file could not be parsed (unknown format, bad syntax, wrong encoding, binary data)."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(f"{where}{message}")


class OntologyValidationError(KgError):
    """A parsed ontology breaks a structural rule (cycle, dangling reference, duplicate id)."""


class CycleError(OntologyValidationError):
    """The ``is_a`` hierarchy contains a cycle; ``cycle`` lists it in order."""

    def __init__(self, cycle: list[str], relation: str = "is_a"):
        self.cycle = cycle
        shown = " -> ".join([*cycle, cycle[0]]) if cycle else "?"
        super().__init__(f"{relation} cycle: {shown} (pass --allow-cycles to load anyway)")


class DanglingReferenceError(OntologyValidationError):
    """A relation points at a concept that the ontology does not define."""

    def __init__(self, missing: list[tuple[str, str, str]]):
        self.missing = missing
        shown = "; ".join(f"{s} {p} {o}" for s, p, o in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        super().__init__(
            f"{len(missing)} relation(s) point at undefined concepts: {shown}{more} "
            "(pass --drop-dangling to drop them)"
        )


class DuplicateIdError(OntologyValidationError):
    """Two concepts share one id."""

    def __init__(self, concept_id: str, where: str = ""):
        self.concept_id = concept_id
        super().__init__(f"duplicate concept id {concept_id!r}{where}")


class StoreError(KgError):
    """The ontology store refused an operation."""


class StoreBusyError(StoreError):
    """Another process holds the store's write lock (two loads at once)."""


class NotFoundError(KgError):
    """An ontology, version or concept does not exist."""


class MappingError(KgError):
    """Dataset labels could not be mapped to concepts."""
