"""findings_json: the response's findings as the batch worker builds them; respond wraps
them unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from models.explain import Evidence, FindingExplanation, Heatmap, ImageExplanation
from models.transforms import Geometry
from service.decode import DecodedImage
from service.pipeline import BatchItemResult, PredictOptions, findings_json, respond

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


class _Predictor:
    def describe(self) -> dict[str, Any]:
        return {"model": {"name": "m", "version": "v1"}, "ontology": {"name": "o", "version": "x"}}


def _explanation(geometry: Geometry | None = None) -> ImageExplanation:
    def finding(name: str, p: float, own: float | None) -> FindingExplanation:
        return FindingExplanation(
            name=name,
            concept_id=f"C-{name}",
            label=name.lower(),
            probability=p,
            threshold=own,
            heatmap=Heatmap(np.eye(2, dtype=np.float32) / 3, (0, 0), 0.5, geometry),
            evidence=[Evidence("E1", "Fluid", 0.123456789), Evidence(f"C-{name}", name, 1, True)],
        )

    return ImageExplanation(
        index=0,
        grid=(2, 2),
        geometry=geometry,
        findings=[finding("Effusion", 0.4, 0.5), finding("Mass", 0.2, None)],
    )


def test_thresholds_come_from_the_request_then_the_service_then_the_checkpoint() -> None:
    expl, paths = _explanation(), {"C-Effusion": [{"nodes": [], "edges": [], "score": 1.0}]}
    asked = findings_json(expl, paths, PredictOptions(threshold=0.1), 0.3)
    assert [f["threshold"] for f in asked] == [0.1, 0.1] and all(f["positive"] for f in asked)
    service = findings_json(expl, paths, PredictOptions(), 0.3)
    assert [(f["threshold"], f["positive"]) for f in service] == [(0.3, True), (0.3, False)]
    own = findings_json(expl, paths, PredictOptions(), None)  # the checkpoint's, else 0.5
    assert [(f["threshold"], f["positive"]) for f in own] == [(0.5, False), (0.5, False)]
    effusion = own[0]
    assert effusion["paths"] == paths["C-Effusion"] and own[1]["paths"] == []
    # the finding's own concept is not its evidence; relevances keep 5 decimals
    assert effusion["evidence"] == [
        {"concept": {"id": "E1", "label": "Fluid"}, "relevance": 0.12346}
    ]


def test_heat_maps_match_the_explanations_own_and_can_be_left_out() -> None:
    geo = Geometry(orig_height=100, orig_width=50, size=64, scale_y=0.64, scale_x=0.64,
                   pad_top=0, pad_left=16)  # fmt: skip
    expl = _explanation(geo)
    [heat, _] = [f["heatmap"] for f in findings_json(expl, {}, PredictOptions(), None)]
    want = expl.findings[0].heatmap.to_dict()
    assert heat == {k: want[k] for k in ("rows", "cols", "values", "peak", "extent")}
    off = findings_json(expl, {}, PredictOptions(heatmap=False), None)
    assert [f["heatmap"] for f in off] == [None, None]


def test_respond_wraps_the_workers_findings() -> None:
    findings = findings_json(_explanation(), {}, PredictOptions(), 0.3)
    item = BatchItemResult(_explanation(), 1.0, 0.5, {}, findings, orjson.dumps(findings))
    image = DecodedImage(np.zeros((4, 4), np.float32), "png", 4, 4, notes=["inverted"])
    body = respond(item, image, PredictOptions(), _Predictor(), decode_ms=2.0)  # type: ignore[arg-type]
    assert body["findings"] is findings
    assert body["notes"] == ["inverted"] and body["timings"]["total_ms"] == 3.5
    assert body["model"] == {"name": "m", "version": "v1"}


def test_prepared_inputs_score_as_the_workers_own_preprocessing(tiny_checkpoint: Path) -> None:
    """A request prepared on its decode thread (decode_prepared) gets the same answer as one
    the worker preprocesses, alone or mixed in one batch with unprepared ones."""
    from models.inference import Predictor
    from service.pipeline import InferencePipeline, PredictRequest, decode, decode_prepared

    pipeline = InferencePipeline(Predictor.load(tiny_checkpoint))
    files = sorted(SAMPLES.glob("*.png"))
    plain = [PredictRequest(decode(p.read_bytes(), "image/png", p.name)) for p in files]
    prepared = []
    for p in files:
        image, ready, _ = decode_prepared(pipeline, p.read_bytes(), "image/png", p.name)
        prepared.append(PredictRequest(image, prepared=ready))
    assert all(r.prepared is not None and r.prepared[0].shape[0] == 1 for r in prepared)
    mixed = [prepared[0], *plain[1:-1], prepared[-1]]
    expected = [r.findings_encoded for r in pipeline.run_batch(plain)]
    for batch in (prepared, mixed):
        assert [r.findings_encoded for r in pipeline.run_batch(batch)] == expected


def test_a_plain_gray_png_upload_is_its_own_thumbnail() -> None:
    """thumbnail_for keeps the upload only where it has exactly the pixels thumbnail_png would
    write and nothing else."""
    import io
    import struct
    import zlib

    from PIL import Image, PngImagePlugin

    from service.pipeline import decode, thumbnail_for, thumbnail_png

    def png(image: Image.Image, **save: Any) -> bytes:
        out = io.BytesIO()
        image.save(out, format="PNG", **save)
        return out.getvalue()

    for path in sorted(SAMPLES.glob("*.png")):
        data = path.read_bytes()
        decoded = decode(data, "image/png", path.name)
        assert thumbnail_for(data, decoded) is data
        drawn = Image.open(io.BytesIO(thumbnail_png(decoded.pixels)))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(drawn))

    gray = Image.open(SAMPLES / "nih_00020751_003.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Doe^Jane")
    plain = png(gray)
    idat = b"\0" * 1_000_000  # an extra IDAT a decoder never reads: bytes beside the pixels
    padded = (
        plain[:-12]
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
        + plain[-12:]
    )
    for data in (
        png(gray, pnginfo=info),  # metadata
        png(gray.resize((600, 600))),  # larger than a thumbnail
        png(gray.convert("RGB")),  # converted on decoding (a note says so)
        padded,
    ):
        assert thumbnail_for(data, decode(data, "image/png", "x.png")) is None
