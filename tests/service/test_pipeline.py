"""respond() takes the findings the batch worker built, unless they were built for other
options or another default threshold."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.explain import Evidence, FindingExplanation, Heatmap, ImageExplanation
from service.decode import DecodedImage
from service.pipeline import BatchItemResult, PredictOptions, findings_json, respond


class _Predictor:
    def describe(self) -> dict[str, Any]:
        return {"model": {"name": "m", "version": "v1"}, "ontology": {"name": "o", "version": "x"}}


def _item(options: PredictOptions, default: float | None) -> BatchItemResult:
    finding = FindingExplanation(
        name="Effusion",
        concept_id="C1",
        label="Pleural effusion",
        probability=0.4,
        threshold=0.5,
        heatmap=Heatmap(np.eye(2, dtype=np.float32), (0, 0), 0.5),
        evidence=[Evidence("C2", "Fluid", 0.123456789)],
    )
    expl = ImageExplanation(index=0, grid=(2, 2), geometry=None, findings=[finding])
    paths = {"C1": [{"nodes": [], "edges": [], "score": 1.0}]}
    return BatchItemResult(
        explanation=expl,
        inference_ms=1.0,
        explain_ms=0.5,
        paths=paths,
        findings=findings_json(expl, paths, options, default),
        findings_for=(options, default),
    )


def test_respond_uses_the_workers_findings_when_built_for_the_same_request() -> None:
    options = PredictOptions(threshold=None)
    item = _item(options, 0.3)
    image = DecodedImage(np.zeros((4, 4), np.float32), "png", 4, 4)
    body = respond(item, image, options, _Predictor(), default_threshold=0.3)  # type: ignore[arg-type]
    assert item.findings is not None and body["findings"] is item.findings
    [f] = item.findings
    assert f["threshold"] == 0.3 and f["positive"] is True
    assert f["heatmap"] == {
        "rows": 2,
        "cols": 2,
        "values": [[1.0, 0.0], [0.0, 1.0]],
        "peak": [0, 0],
    }
    assert f["evidence"] == [{"concept": {"id": "C2", "label": "Fluid"}, "relevance": 0.12346}]
    # another default threshold, or other options: built again, not reused
    other = respond(item, image, options, _Predictor(), default_threshold=None)  # type: ignore[arg-type]
    assert other["findings"] is not item.findings and other["findings"][0]["threshold"] == 0.5
    no_heat = PredictOptions(heatmap=False)
    third = respond(item, image, no_heat, _Predictor(), default_threshold=0.3)  # type: ignore[arg-type]
    assert third["findings"][0]["heatmap"] is None
