"""The ontology the service knows: versions, concepts and paths between them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from kg.paths import MAX_HOPS_LIMIT, PathFinder
from service.deps import PredictKey, ReadyState, State
from service.errors import NotFoundError, ServiceError
from service.schemas import (
    KEY_ERRORS,
    ConceptDetail,
    OntologyList,
    PathList,
    error_responses,
)

router = APIRouter(prefix="/v1", tags=["ontology"])

_ERRORS = error_responses(*KEY_ERRORS, 400, 404, 422)
#: Routes over the serving ontology also answer 503 while the model loads or drains.
_READY_ERRORS = error_responses(*KEY_ERRORS, 400, 404, 422, 503)


@router.get("/ontologies", response_model=OntologyList, responses=_ERRORS)
async def ontologies(state: State, _key: PredictKey) -> dict[str, Any]:
    """Stored ontology versions; ``serving`` marks the one the model runs over."""
    if state.store is None:
        raise ServiceError("ontology store is not available")
    versions = await run_in_threadpool(state.store.versions)
    serving = state.predictor.ontology_version if state.predictor else None
    return {
        "ontologies": [
            {
                "name": v.name,
                "version": v.version,
                "active": v.active,
                "concepts": v.n_concepts,
                "relations": v.n_relations,
                "format": v.format,
                "created_at": v.created_at,
                "serving": v.version == serving,
            }
            for v in versions
        ]
    }


@router.get("/concepts/{concept_id}", response_model=ConceptDetail, responses=_READY_ERRORS)
async def concept(concept_id: str, state: ReadyState, _key: PredictKey) -> dict[str, Any]:
    """One concept of the serving ontology, with its relations."""
    assert state.store is not None and state.graph is not None and state.predictor is not None
    graph = state.graph
    if concept_id not in graph.index:
        raise NotFoundError(f"unknown concept id {concept_id!r}")
    c = await run_in_threadpool(state.store.concept, concept_id, state.ontology_ref)
    node = graph.index[concept_id]
    return {
        **c.to_dict(),
        "relations": [
            {
                "relation": graph.relations[r],
                "direction": "forward" if d == 1 else "backward",
                "concept": {"id": graph.ids[v], "label": graph.labels[v]},
            }
            for v, r, d, _ in graph.adjacency[node]
        ],
        "ontology": {
            "name": state.predictor.ontology_name,
            "version": state.predictor.ontology_version,
        },
    }


@router.get("/paths", response_model=PathList, responses=_READY_ERRORS)
async def paths(
    state: ReadyState,
    _key: PredictKey,
    source: Annotated[str, Query(alias="from", min_length=1, max_length=200)],
    target: Annotated[str, Query(alias="to", min_length=1, max_length=200)],
    max_hops: Annotated[int, Query(ge=1, le=MAX_HOPS_LIMIT)] = 4,
    k: Annotated[int, Query(ge=1, le=50)] = 5,
) -> dict[str, Any]:
    """Top-k paths between two concepts of the serving ontology, relations either way."""
    assert state.graph is not None and state.predictor is not None
    # The batch worker's finder, whose caches the explanations have filled.
    finder = state.pipeline.finder if state.pipeline is not None else PathFinder(state.graph)
    found = finder.paths(source, target, max_hops=max_hops, k=k)
    return {
        "ontology": {
            "name": state.predictor.ontology_name,
            "version": state.predictor.ontology_version,
        },
        "paths": [p.to_dict() for p in found],
    }
