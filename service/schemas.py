"""The HTTP API's schemas: what clients send and receive (never tensors or internals)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code.")
    message: str = Field(description="What was wrong, naming the field or value.")


class ErrorResponse(BaseModel):
    error: ErrorBody


#: What any route behind an API key may answer: no or an invalid key (401), a key without
#: the route's scope (403), the key's rate limit (429).
KEY_ERRORS = (401, 403, 429)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each of ``statuses`` answers an :class:`ErrorResponse`.

    Every status a route can answer is declared with its body, so that clients (and the API
    fuzzer, ``bench/fuzz_api.py``) can rely on the OpenAPI document; FastAPI's own 422
    schema is replaced, as the error handlers answer validation errors with this body too.
    """
    return {status: {"model": ErrorResponse} for status in sorted(set(statuses))}


class ConceptRef(BaseModel):
    id: str
    label: str


class Heatmap(BaseModel):
    """A finding's attention over the image, on the model's patch grid, in [0, 1]."""

    rows: int
    cols: int
    values: list[list[float]] = Field(description="rows x cols, row-major, 1 = hottest cell")
    peak: list[int] = Field(description="[row, col] of the hottest cell")
    extent: list[float] | None = Field(
        None, description="[x0, y0, x1, y1]: the grid's extent in original image pixels"
    )


class Evidence(BaseModel):
    concept: ConceptRef
    relevance: float = Field(
        description=(
            "This concept's share of the finding's evidence, in [0, 1]: by default "
            "(KGDX_EVIDENCE=attention) its share of the finding's attention over the "
            "concepts; with KGDX_EVIDENCE=attribution its share of the logit the finding "
            "would lose, to first order, without each concept whose removal would lower it"
        )
    )


class PathNode(BaseModel):
    id: str
    label: str


class PathEdge(BaseModel):
    relation: str
    direction: str = Field(description="'forward' (subject->object) or 'backward'")


class OntologyPath(BaseModel):
    nodes: list[PathNode]
    edges: list[PathEdge]
    score: float


class Finding(BaseModel):
    name: str = Field(description="The finding's label name, e.g. 'Effusion'")
    concept: ConceptRef
    probability: float
    threshold: float
    positive: bool
    heatmap: Heatmap | None = None
    evidence: list[Evidence] = Field(default_factory=list)
    paths: list[OntologyPath] = Field(default_factory=list)


class ModelInfo(BaseModel):
    name: str
    version: str


class OntologyInfo(BaseModel):
    name: str
    version: str


class Timings(BaseModel):
    """Where a request's time went, in milliseconds."""

    decode_ms: float = Field(
        description="Decoding the upload and preparing the model input (letterbox, "
        "normalisation), on a decode thread"
    )
    queue_ms: float = Field(description="Waiting for a batch, from submission to its start")
    inference_ms: float = Field(
        description="The whole batch's model step: its inputs stacked (or preprocessed, when "
        "not prepared on a decode thread) and the forward pass"
    )
    explain_ms: float = Field(
        description="This image's share of heat maps and evidence, plus its ontology paths "
        "and findings"
    )
    total_ms: float = Field(description="The sum of the four")


class ImageInfo(BaseModel):
    kind: str
    width: int
    height: int
    frames: int = 1
    modality: str | None = None
    view_position: str | None = None


class PredictResponse(BaseModel):
    id: str
    created_at: str
    model: ModelInfo
    ontology: OntologyInfo
    image: ImageInfo
    findings: list[Finding]
    notes: list[str] = Field(default_factory=list)
    timings: Timings


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: ModelInfo | None = None
    ontology: OntologyInfo | None = None
    device: str | None = None


class OntologyVersion(BaseModel):
    name: str
    version: str
    active: bool
    concepts: int
    relations: int
    format: str
    created_at: str
    serving: bool = Field(False, description="The version the loaded model runs over")


class OntologyList(BaseModel):
    ontologies: list[OntologyVersion]


class ConceptDetail(BaseModel):
    id: str
    label: str
    definition: str
    synonyms: list[str]
    xrefs: list[str]
    obsolete: bool
    replaced_by: list[str]
    relations: list[ConceptRelation]
    ontology: OntologyInfo


class ConceptRelation(BaseModel):
    relation: str
    direction: str
    concept: ConceptRef


class PathList(BaseModel):
    ontology: OntologyInfo
    paths: list[OntologyPath]


ConceptDetail.model_rebuild()
