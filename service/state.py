"""What the service holds while it runs: loaded once in the lifespan, read by every request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kg.graph import ConceptGraph
from kg.store import GraphStore
from models.inference import Predictor
from service.apikeys import ApiKeyStore
from service.audit import AuditLog
from service.batcher import DynamicBatcher
from service.db import ServiceDatabase
from service.instances import InstanceStore
from service.metrics import Metrics
from service.pipeline import BatchItemResult, InferencePipeline, PredictRequest
from service.rate_limit import RateLimiter
from service.results import ResultStore
from service.settings import Settings

if TYPE_CHECKING:
    from service.jobs import JobQueue
    from service.study_worker import StudyWorker


@dataclass
class AppState:
    """Heavy state of one app instance; ``ready`` once the model and ontology are loaded."""

    settings: Settings
    metrics: Metrics
    db: ServiceDatabase | None = None
    store: GraphStore | None = None
    results: ResultStore | None = None
    instances: InstanceStore | None = None
    audit: AuditLog | None = None
    apikeys: ApiKeyStore | None = None
    predictor: Predictor | None = None
    graph: ConceptGraph | None = None
    pipeline: InferencePipeline | None = None
    batcher: DynamicBatcher[PredictRequest, BatchItemResult] | None = None
    decode_pool: ThreadPoolExecutor | None = None
    rate_limiter: RateLimiter | None = None
    ontology_ref: str = ""
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    jobs: JobQueue | None = None  # durable study jobs (service.jobs)
    worker: StudyWorker | None = None  # runs them in the background (service.study_worker)
    extras: dict[str, object] = field(default_factory=dict)
