"""The FastAPI application: ``create_app(settings)`` with a lifespan that loads everything once.

Startup: database, ontology store, model + ontology + entity embeddings, the inference
worker. ``/readyz`` turns 200 only then; a model that cannot load leaves the service live
(``/healthz``) but not ready, with the reason in ``/readyz``. Shutdown drains the queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from kg.errors import KgError
from kg.graph import ConceptGraph
from kg.store import GraphStore
from models.checkpoint import read_checkpoint_info
from models.default_checkpoint import resolve_checkpoint_dir
from models.errors import ModelError
from models.inference import Predictor
from models.ontology_source import load_ontology_spec, ontology_for_checkpoint
from service.apikeys import ApiKeyStore
from service.audit import AuditLog
from service.batcher import DynamicBatcher
from service.db import ServiceDatabase
from service.direct_route import DirectRouteMiddleware
from service.error_handlers import install_error_handlers
from service.heap import freeze_startup_heap, thaw_heap
from service.instances import InstanceStore
from service.logs import configure_logging
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.pipeline import InferencePipeline
from service.rate_limit import RateLimiter
from service.results import ResultStore
from service.routes import (
    dicomweb,
    docs,
    health,
    ontology,
    predict,
    reports,
    results,
    studies,
)
from service.settings import Settings, get_settings
from service.state import AppState
from service.study_worker import StudyWorker, job_queue_for, source_finder

log = logging.getLogger("kgdx.app")


def load_model(state: AppState) -> None:
    """Load ontology, model and entity embeddings into ``state`` (blocking; run in a thread)."""
    settings = state.settings
    assert state.store is not None
    store = state.store
    directory = resolve_checkpoint_dir(settings.checkpoint)
    info = read_checkpoint_info(directory)
    if settings.ontology is not None:
        onto = load_ontology_spec(settings.ontology, store)
    else:
        trained = info.get("ontology") or {}
        found = ontology_for_checkpoint(
            str(trained.get("name") or ""), str(trained.get("version") or ""), store
        )
        onto = found if found is not None else load_ontology_spec(None, store)
    saved, _ = store.save(onto, activate=not any(v.active for v in store.versions(onto.name)))
    state.ontology_ref = saved.ref
    predictor = Predictor.load(
        directory,
        ontology=onto,
        device=settings.device,
        allow_other_ontology=settings.allow_other_ontology,
        store=store,
    )
    predictor.evidence = settings.evidence
    assert predictor.arrays is not None
    state.graph = ConceptGraph.from_arrays(predictor.arrays)
    state.pipeline = InferencePipeline(predictor, state.graph)
    state.predictor = predictor


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.kgdx
    settings = state.settings
    configure_logging(settings.log_level, settings.log_json)
    state.db = ServiceDatabase(settings.db_url)
    state.db.create_all()
    state.results = ResultStore(state.db, durable=settings.durable_results)
    state.instances = InstanceStore.default(state.db)
    state.audit = AuditLog(state.db, durable=settings.durable_results)
    state.apikeys = ApiKeyStore(state.db)
    state.store = GraphStore(settings.db_url)
    state.decode_pool = ThreadPoolExecutor(settings.decode_threads, "kgdx-decode")
    if settings.rate_limit_per_minute:
        state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    if settings.no_auth:
        log.warning(
            "authentication is OFF (--no-auth): every request is let in on %s", settings.host
        )
    try:
        await anyio.to_thread.run_sync(load_model, state)
    except (ModelError, KgError, OSError) as e:
        state.load_error = str(e)
        log.error("model not loaded: %s", e)
    if state.pipeline is not None:
        state.batcher = DynamicBatcher(
            state.pipeline.run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            name=str(state.predictor.device) if state.predictor else "cpu",
            observer=state.metrics,
        )
        await state.batcher.start()
        frozen = await anyio.to_thread.run_sync(freeze_startup_heap)
        log.debug("start-up heap frozen: %d objects", frozen)
        state.ready = True
        log.info(
            "ready: model %s, ontology %s",
            state.predictor and state.predictor.model_version,
            state.ontology_ref,
        )
    # Study jobs (DICOMweb ingest): the worker turns quiet studies into jobs and runs them
    # through the batcher above; it needs the model, and stops before the batcher drains.
    state.jobs = job_queue_for(state)
    state.extras[reports.SR_SOURCE_KEY] = source_finder(state)  # job results' SR in their study
    if state.batcher is not None:
        state.worker = StudyWorker(state)
        await state.worker.start()
    try:
        yield
    finally:
        thaw_heap()  # first: nothing below may skip it
        state.draining = True
        state.ready = False
        if state.worker is not None:  # finish or hand back the current job
            await state.worker.stop(timeout_s=settings.drain_timeout_s)
        if state.batcher is not None:
            await state.batcher.stop(drain=True, timeout_s=settings.drain_timeout_s)
        state.decode_pool.shutdown(wait=False, cancel_futures=True)
        await anyio.to_thread.run_sync(state.results.close, settings.drain_timeout_s)
        if state.audit is not None:
            await anyio.to_thread.run_sync(state.audit.close, settings.drain_timeout_s)
        state.store.close()
        state.db.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; nothing heavy happens until its lifespan starts."""
    settings = settings or get_settings()
    app = FastAPI(
        title="kgdx",
        summary="Knowledge-graph-augmented diagnosis of medical images",
        version=_version(),
        lifespan=lifespan,
        # The schema is served behind a key by service.routes.docs, the browser UIs only
        # without authentication (they cannot send a key).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    state = AppState(settings=settings, metrics=Metrics())
    app.state.kgdx = state
    install_error_handlers(app)
    # Innermost: predict goes straight to its endpoint (service.direct_route), below CORS
    # and the request context, which see it as they see every request.
    app.add_middleware(DirectRouteMiddleware, path="/v1/predict")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(RequestContextMiddleware, state=state)
    for module in (health, predict, results, reports, ontology, studies, dicomweb, docs):
        app.include_router(module.router)
    if settings.no_auth:
        app.include_router(docs.ui_router)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kgdx")
    except PackageNotFoundError:
        return "0"
