"""The inference pipeline: ``decode -> preprocess -> predict -> explain -> respond``.

Each stage is a function that can be tested alone; :class:`InferencePipeline` composes the
model-side stages for one batch (run on the inference worker's thread), ending with each
image's findings as the API's JSON (:func:`findings_json`, with ontology paths from ``kg``),
and :func:`respond` wraps them into the response.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import torch

from kg.graph import ConceptGraph
from kg.paths import PathFinder
from models.explain import DECIMALS, Evidence, FindingExplanation, ImageExplanation
from models.inference import Predictor
from models.outputs import KgdxOutput
from models.transforms import Geometry
from service.decode import DecodedImage, DecodeLimits, decode_image
from service.png import gray_png, is_plain_gray_png

#: Relations whose far end is a candidate diagnosis for a finding.
DIAGNOSIS_RELATIONS = ("suggests", "associated_with")


@dataclass(frozen=True)
class PredictOptions:
    """Per-request options."""

    threshold: float | None = None  # decision threshold; None = the checkpoint's, else 0.5
    top_k_paths: int = 3  # ontology paths per finding
    heatmap: bool = True  # include heat maps
    evidence_k: int = 5  # evidence concepts per finding
    max_hops: int = 4  # longest explanation path


@dataclass
class PredictRequest:
    """One decoded image waiting for inference."""

    image: DecodedImage
    text: str | None = None
    options: PredictOptions = field(default_factory=PredictOptions)
    default_threshold: float | None = None  # the service's threshold (see _threshold)
    # The model input (1, S, S) and its letterbox geometry, when the request's own thread
    # prepared them (InferencePipeline.prepare); else the worker preprocesses the image.
    prepared: tuple[torch.Tensor, Geometry] | None = None


@dataclass
class BatchItemResult:
    """What the worker hands back for one image of a batch."""

    explanation: ImageExplanation
    inference_ms: float  # the whole batch's forward pass
    explain_ms: float  # this image's share of explain + paths
    paths: dict[str, list[dict[str, Any]]]  # finding concept id -> serialised paths
    # The response's findings (findings_json), built on the worker right after the paths
    # while their data is still in the caches: respond only wraps them.
    findings: list[dict[str, Any]]
    # The same findings as JSON, encoded there too: the route splices these bytes into its
    # answer (orjson.Fragment). Encoded later on the event loop, after the next forward pass
    # has swept the caches, the same 19 kB took 0.12 ms instead of 0.02 ms.
    findings_encoded: bytes


# -- stages --------------------------------------------------------------------------------


def decode(
    data: bytes,
    content_type: str | None = None,
    filename: str | None = None,
    limits: DecodeLimits | None = None,
) -> DecodedImage:
    """Bytes of a PNG, JPEG or DICOM file -> grayscale pixels in [0, 1] (see service.decode)."""
    return decode_image(
        data, content_type=content_type, filename=filename, limits=limits or DecodeLimits()
    )


def preprocess(
    predictor: Predictor, images: Sequence[DecodedImage]
) -> tuple[torch.Tensor, list[Geometry]]:
    """Decoded images -> the model's input batch ``(B, 1, S, S)`` and letterbox geometries."""
    return predictor.preprocess([im.pixels for im in images])


def predict(
    predictor: Predictor, batch: torch.Tensor, texts: Sequence[str | None] | None = None
) -> KgdxOutput:
    """Score a preprocessed batch: a forward pass, plus the evidence attribution's backward
    pass through fusion and decoder with ``KGDX_EVIDENCE=attribution`` (see
    :meth:`Predictor.predict <models.inference.Predictor.predict>`)."""
    return predictor.predict(batch, texts)


def explain(
    predictor: Predictor,
    output: KgdxOutput,
    geometries: Sequence[Geometry],
    evidence_k: int = 5,
) -> list[ImageExplanation]:
    """Heat maps and ranked evidence concepts per image and finding."""
    return predictor.explain(output, geometries, top_k=evidence_k)


def finding_paths(
    finder: PathFinder,
    finding: FindingExplanation,
    *,
    k: int,
    max_hops: int,
) -> list[dict[str, Any]]:
    """Top-``k`` ontology paths from a finding to its evidence concepts and candidate diagnoses.

    The evidence's relevances make paths through the concepts the model attended to
    cheaper, so the first paths are the ones the image supports.
    """
    if k <= 0 or finding.concept_id not in finder.graph.index:
        return []
    graph = finder.graph
    relevance = finding.relevance_map()
    targets = set(relevance)
    node = graph.index[finding.concept_id]
    wanted = {i for i, r in enumerate(graph.relations) if r in DIAGNOSIS_RELATIONS}
    for v, r, d, _ in graph.adjacency[node]:
        if d == 1 and r in wanted:
            targets.add(graph.ids[v])
    targets.discard(finding.concept_id)
    if not targets:
        return []
    paths = finder.paths_to_any(
        finding.concept_id, sorted(targets), max_hops=max_hops, k=k, relevance=relevance
    )
    return [p.to_dict() for p in paths]


def respond(
    item: BatchItemResult,
    image: DecodedImage,
    options: PredictOptions,
    predictor: Predictor,
    *,
    result_id: str | None = None,
    decode_ms: float = 0.0,
    queue_ms: float = 0.0,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The response body of ``POST /v1/predict`` for one image (see service.schemas), around
    the findings the batch worker built (:meth:`InferencePipeline.run_batch`)."""
    info = image.dicom
    described = predictor.describe()
    return {
        "id": result_id or uuid.uuid4().hex,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": described["model"]["name"], "version": described["model"]["version"]},
        "ontology": described["ontology"],
        "image": {
            "kind": image.kind,
            "width": image.width,
            "height": image.height,
            "frames": info.frames if info else 1,
            "modality": info.modality if info else None,
            "view_position": info.view_position if info else None,
        },
        "findings": item.findings,
        "notes": [*image.notes, *notes],
        "timings": {
            "decode_ms": round(decode_ms, 3),
            "queue_ms": round(queue_ms, 3),
            "inference_ms": round(item.inference_ms, 3),
            "explain_ms": round(item.explain_ms, 3),
            "total_ms": round(decode_ms + queue_ms + item.inference_ms + item.explain_ms, 3),
        },
    }


def findings_json(
    explanation: ImageExplanation,
    paths: dict[str, list[dict[str, Any]]],
    options: PredictOptions,
    default_threshold: float | None,
) -> list[dict[str, Any]]:
    """The ``findings`` of a response: probability, decision, heat map, evidence, paths."""
    explained = explanation.findings
    heatmaps = _heatmaps(explanation) if options.heatmap else [None] * len(explained)
    findings = []
    for f, heat in zip(explained, heatmaps, strict=True):
        threshold = _threshold(f, options, default_threshold)
        findings.append(
            {
                "name": f.name,
                "concept": {"id": f.concept_id, "label": f.label},
                "probability": round(float(f.probability), 6),
                "threshold": threshold,
                "positive": bool(f.probability >= threshold),
                "heatmap": heat,
                "evidence": [_evidence(e) for e in f.evidence if not e.is_self],
                "paths": paths.get(f.concept_id, []),
            }
        )
    return findings


def _heatmaps(explanation: ImageExplanation) -> list[dict[str, Any]]:
    """Each finding's ``heatmap``: ``rows, cols, values, peak`` and, with a geometry,
    ``extent`` (as :meth:`models.explain.Heatmap.to_dict`). The maps of one image share its
    grid and geometry, so the values are rounded in one numpy call and the extent once."""
    maps = [f.heatmap for f in explanation.findings]
    if not maps:
        return []
    values = np.round(np.stack([m.values for m in maps]).astype(np.float64), DECIMALS).tolist()
    extent = maps[0].extent
    shared = {} if extent is None else {"extent": [round(x, 3) for x in extent]}
    return [
        {"rows": m.rows, "cols": m.cols, "values": v, "peak": list(m.peak), **shared}
        for m, v in zip(maps, values, strict=True)
    ]


def _evidence(e: Evidence) -> dict[str, Any]:
    return {
        "concept": {"id": e.concept_id, "label": e.label},
        "relevance": round(e.relevance, DECIMALS),
    }


def _threshold(
    finding: FindingExplanation, options: PredictOptions, default: float | None
) -> float:
    if options.threshold is not None:
        return float(options.threshold)
    if default is not None:
        return float(default)
    if finding.threshold is not None:
        return float(finding.threshold)
    return 0.5


# -- composition ---------------------------------------------------------------------------


class InferencePipeline:
    """``preprocess -> predict -> explain`` (+ paths) for one batch, on the worker thread.

    Args:
        predictor: the loaded model.
        graph: the ontology graph the model runs over, for path search.
    """

    def __init__(self, predictor: Predictor, graph: ConceptGraph | None = None):
        self.predictor = predictor
        if graph is None:
            if predictor.arrays is None:
                raise ValueError("predictor has no ontology graph; pass graph=")
            graph = ConceptGraph.from_arrays(predictor.arrays)
        self.finder = PathFinder(graph)

    def prepare(self, image: DecodedImage) -> tuple[torch.Tensor, Geometry]:
        """One image's model input ``(1, S, S)`` and geometry, for
        :attr:`PredictRequest.prepared`: the service prepares each request on its decode
        thread, beside the batch in flight, so the worker's batch starts with the forward
        pass.

        Raises:
            DataError: NaN or infinite pixels (see :meth:`Predictor.preprocess`).
        """
        batch, geometries = preprocess(self.predictor, [image])
        return batch[0], geometries[0]

    def _inputs(self, requests: list[PredictRequest]) -> tuple[torch.Tensor, list[Geometry]]:
        """The batch's model inputs: the prepared ones as they are, the rest preprocessed."""
        missing = [r.image for r in requests if r.prepared is None]
        if len(missing) == len(requests):
            return preprocess(self.predictor, missing)
        fresh = zip(*preprocess(self.predictor, missing), strict=True) if missing else iter(())
        pairs = [r.prepared if r.prepared is not None else next(fresh) for r in requests]
        return torch.stack([x for x, _ in pairs]), [g for _, g in pairs]

    def run_batch(self, requests: list[PredictRequest]) -> list[BatchItemResult]:
        """Score and explain a batch; one result per request, in order."""
        t0 = time.perf_counter()
        batch, geometries = self._inputs(requests)
        texts = [r.text for r in requests]
        output = predict(self.predictor, batch, texts if any(texts) else None)
        t1 = time.perf_counter()
        evidence_k = max(r.options.evidence_k for r in requests)
        explanations = explain(self.predictor, output, geometries, evidence_k)
        results = []
        t2 = time.perf_counter()
        share = (t2 - t1) / len(requests)
        for req, expl in zip(requests, explanations, strict=True):
            t3 = time.perf_counter()
            for f in expl.findings:
                f.evidence = f.evidence[: req.options.evidence_k + 1]
            paths = {
                f.concept_id: finding_paths(
                    self.finder, f, k=req.options.top_k_paths, max_hops=req.options.max_hops
                )
                for f in expl.findings
            }
            findings = findings_json(expl, paths, req.options, req.default_threshold)
            encoded = orjson.dumps(findings)
            results.append(
                BatchItemResult(
                    explanation=expl,
                    inference_ms=(t1 - t0) * 1e3,
                    explain_ms=(share + time.perf_counter() - t3) * 1e3,
                    paths=paths,
                    findings=findings,
                    findings_encoded=encoded,
                )
            )
        return results


def thumbnail_for(data: bytes, image: DecodedImage, max_side: int = 512) -> bytes | None:
    """The upload itself as the image's thumbnail, when it is one already: a plain 8-bit
    grayscale PNG (:func:`service.png.is_plain_gray_png`: no metadata chunks) decoded as
    it stands (no notes) and no larger than ``max_side``. Its pixels are exactly those
    :func:`thumbnail_png` would write. ``None`` otherwise: draw one with
    :func:`thumbnail_png`."""
    if image.kind != "png" or image.notes or max(image.width, image.height) > max_side:
        return None
    return data if is_plain_gray_png(data, image.width, image.height) else None


def thumbnail_png(pixels: np.ndarray, max_side: int = 512) -> bytes:
    """A small 8-bit PNG of the decoded image, kept for the overlay endpoint."""
    from PIL import Image

    image = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if max(image.shape) > max_side:
        small = Image.fromarray(image, mode="L")
        small.thumbnail((max_side, max_side))
        image = np.asarray(small)
    return gray_png(image)


def decode_prepared(
    pipeline: InferencePipeline,
    data: bytes,
    content_type: str | None = None,
    filename: str | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[DecodedImage, tuple[torch.Tensor, Geometry], bytes | None]:
    """:func:`decode`, :meth:`InferencePipeline.prepare` and :func:`thumbnail_for`: a
    request's whole share of the work before its batch, in one job of the service's decode
    threads. The last item is the upload when it can serve as its own thumbnail, else
    ``None`` (draw one with :func:`thumbnail_png`)."""
    image = decode(data, content_type, filename, limits)
    return image, pipeline.prepare(image), thumbnail_for(data, image)
