"""The service end to end: TestClient with the lifespan, a tiny model, real storage and keys."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from service.pipeline import InferencePipeline
from service.schemas import PredictResponse
from tests.service import images
from tests.service.conftest import Served

PNG = images.png_bytes(width=64, height=48)


def _predict(served: Served, data: bytes = PNG, name: str = "x.png", **form: str):
    return served.client.post(
        "/v1/predict",
        files={"file": (name, data, "application/octet-stream")},
        data=form,
        headers=served.auth("predict"),
    )


def _assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert fragment.lower() in body["error"]["message"].lower(), body
    assert "Traceback" not in response.text


def test_probes_and_metrics_are_open(served: Served) -> None:
    c = served.client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ontology"]["name"] == "tiny"
    metrics = c.get("/metrics")
    assert metrics.status_code == 200
    assert "kgdx_requests_total" in metrics.text


def test_predict_answers_findings_heatmaps_evidence_and_paths(served: Served) -> None:
    r = _predict(served, text="fever and cough")
    assert r.status_code == 200, r.text
    body = r.json()
    PredictResponse.model_validate(body)  # the route writes the payload without re-validating
    assert body["model"]["name"] and body["model"]["version"]
    assert body["ontology"]["name"] == "tiny" and len(body["ontology"]["version"]) == 16
    assert set(body["timings"]) == {
        "decode_ms",
        "queue_ms",
        "inference_ms",
        "explain_ms",
        "total_ms",
    }
    assert body["image"] == {
        "kind": "png",
        "width": 64,
        "height": 48,
        "frames": 1,
        "modality": None,
        "view_position": None,
    }
    names = [f["name"] for f in body["findings"]]
    assert names == ["Consolidation", "Effusion", "Opacity"]
    for f in body["findings"]:
        assert 0.0 <= f["probability"] <= 1.0
        assert f["positive"] == (f["probability"] >= f["threshold"])
        heat = f["heatmap"]
        values = np.asarray(heat["values"])
        assert values.shape == (heat["rows"], heat["cols"])
        assert values.max() == pytest.approx(1.0) and values.min() >= 0.0
        assert f["evidence"] and all(
            e["concept"]["id"] != f["concept"]["id"] for e in f["evidence"]
        )
        for p in f["paths"]:
            assert p["nodes"][0]["id"] == f["concept"]["id"]
            assert len(p["edges"]) == len(p["nodes"]) - 1 <= 4
            assert {e["direction"] for e in p["edges"]} <= {"forward", "backward"}
    consolidation = body["findings"][0]
    assert any(p["nodes"][-1]["id"] == "X:pneumonia" for p in consolidation["paths"]), (
        "a finding's paths reach its candidate diagnoses"
    )
    # The stored result is the same document.
    stored = served.client.get(f"/v1/results/{body['id']}", headers=served.auth())
    assert stored.status_code == 200 and stored.json() == body


def test_options_threshold_paths_and_no_heatmap(served: Served) -> None:
    body = _predict(served, threshold="0.0", top_k_paths="0", heatmap="false").json()
    assert all(f["positive"] and f["threshold"] == 0.0 for f in body["findings"])
    assert all(f["paths"] == [] and f["heatmap"] is None for f in body["findings"])
    _assert_error(_predict(served, threshold="2"), 422, "threshold")


def test_form_fields_sent_empty_count_as_not_sent(served: Served) -> None:
    # curl -F threshold= sends an empty field: the defaults apply, as with FastAPI's Form()
    r = _predict(served, threshold="", top_k_paths="", heatmap="", text="")
    assert r.status_code == 200, r.text
    assert all(f["heatmap"] is not None for f in r.json()["findings"])


def test_extra_parts_are_ignored_and_too_many_refused(served: Served) -> None:
    files = [
        ("file", ("a.png", PNG, "image/png")),
        ("extra", ("b.png", PNG, "image/png")),
        ("file", ("c.png", PNG, "image/png")),  # a repeated field: its last value counts
    ]
    r = served.client.post(
        "/v1/predict", files=files, data={"unknown": "x"}, headers=served.auth("predict")
    )
    assert r.status_code == 200, r.text
    many = [("file", (f"{i}.png", PNG, "image/png")) for i in range(9)]
    r = served.client.post("/v1/predict", files=many, headers=served.auth("predict"))
    _assert_error(r, 400, "too many files")


def test_overlay_png(served: Served) -> None:
    body = _predict(served).json()
    r = served.client.get(
        f"/v1/results/{body['id']}/overlay.png?finding=Effusion", headers=served.auth()
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size[0] > 0 and im.mode in ("RGB", "RGBA")
    _assert_error(
        served.client.get(
            f"/v1/results/{body['id']}/overlay.png?finding=Nope", headers=served.auth()
        ),
        404,
        "Nope",
    )


def test_ontology_routes(served: Served) -> None:
    c, h = served.client, served.auth()
    listed = c.get("/v1/ontologies", headers=h).json()["ontologies"]
    assert [o["serving"] for o in listed if o["name"] == "tiny"] == [True]
    concept = c.get("/v1/concepts/X:consolidation", headers=h).json()
    assert concept["label"] == "Consolidation"
    assert {
        "relation": "suggests",
        "direction": "forward",
        "concept": {"id": "X:pneumonia", "label": "Pneumonia"},
    } in concept["relations"]
    _assert_error(c.get("/v1/concepts/X:nope", headers=h), 404, "X:nope")
    paths = c.get("/v1/paths", params={"from": "X:consolidation", "to": "X:pleura"}, headers=h)
    assert paths.status_code == 200
    first = paths.json()["paths"][0]
    assert first["nodes"][0]["id"] == "X:consolidation"
    assert first["nodes"][-1]["id"] == "X:pleura"
    _assert_error(
        c.get("/v1/paths", params={"from": "X:nope", "to": "X:pleura"}, headers=h), 404, "X:nope"
    )
    _assert_error(
        c.get(
            "/v1/paths",
            params={"from": "X:consolidation", "to": "X:pleura", "max_hops": 9},
            headers=h,
        ),
        422,
        "max_hops",
    )


def test_keys_and_scopes(served: Served) -> None:
    c = served.client
    _assert_error(c.get("/v1/ontologies"), 401, "API key")
    _assert_error(
        c.get("/v1/ontologies", headers={"Authorization": "Bearer kgdx_00_bad"}), 401, "invalid"
    )
    _assert_error(c.get("/v1/ontologies", headers=served.auth("ingest")), 403, "predict")
    assert c.get("/v1/ontologies", headers={"X-API-Key": served.keys["predict"]}).status_code == 200
    assert c.get("/v1/ontologies", headers=served.auth("admin")).status_code == 200


@pytest.mark.parametrize(
    ("data", "name", "status", "fragment"),
    [
        (b"", "empty.png", 422, "empty"),
        (images.non_image_bytes("text"), "notes.txt", 415, ""),
        (images.truncated(PNG), "cut.png", 422, ""),
        (images.corrupt_png(), "bad.png", 422, ""),
        (images.bomb_png(), "bomb.png", 413, "pixel"),
        (images.png_bytes(width=8, height=8), "tiny.png", 422, "small"),
        (images.no_pixel_dicom_bytes(), "nopix.dcm", 422, "pixel data"),
        (images.inconsistent_dicom_bytes(), "odd.dcm", 422, ""),
        (images.truncated(images.dicom_bytes()), "cut.dcm", 422, ""),
    ],
    ids=[
        "empty",
        "text",
        "truncated-png",
        "corrupt-png",
        "bomb",
        "too-small",
        "dicom-no-pixels",
        "dicom-inconsistent",
        "dicom-truncated",
    ],
)
def test_bad_images_get_clear_errors_and_the_service_keeps_serving(
    served: Served, data: bytes, name: str, status: int, fragment: str
) -> None:
    _assert_error(_predict(served, data, name), status, fragment)
    assert served.client.get("/healthz").status_code == 200
    assert _predict(served).status_code == 200


def test_oversized_upload_is_413(make_service: Callable[..., Served]) -> None:
    served = make_service(max_upload_bytes=4096)
    # Declared larger than the limit: refused by the middleware before the body is read.
    _assert_error(_predict(served, PNG + b"\0" * 80_000), 413, "larger than")
    # Under the middleware's allowance for multipart framing, over the upload limit.
    _assert_error(
        _predict(served, images.png_bytes(width=200, height=200, seed=3) + b"\0" * 5000),
        413,
        "larger than",
    )


@pytest.mark.parametrize(
    ("make", "name", "note"),
    [
        (lambda: images.image_bytes(images.rgb_array(), "PNG"), "rgb.png", "RGB"),
        (lambda: images.rgba_png_bytes(), "rgba.png", ""),
        (lambda: images.png16_bytes(), "16bit.png", ""),
        (lambda: images.jpeg_bytes(), "x.jpg", ""),
        (lambda: images.palette_png_bytes(), "palette.png", ""),
        (lambda: images.dicom_bytes(photometric="MONOCHROME1"), "m1.dcm", "MONOCHROME1"),
        (lambda: images.dicom_bytes(compression="rle"), "rle.dcm", ""),
        (lambda: images.dicom_bytes(frames=3), "multi.dcm", "frame"),
        (lambda: images.large_png_bytes(3000, 2500), "large.png", ""),
    ],
    ids=[
        "rgb",
        "rgba",
        "16bit",
        "jpeg",
        "palette",
        "monochrome1",
        "rle-dicom",
        "multiframe",
        "large",
    ],
)
def test_unusual_but_valid_images_are_accepted(
    served: Served, make: Callable[[], bytes], name: str, note: str
) -> None:
    r = _predict(served, make(), name)
    assert r.status_code == 200, r.text
    if note:
        assert any(note.lower() in n.lower() for n in r.json()["notes"]), r.json()["notes"]


def test_concurrent_requests_share_a_batch(make_service: Callable[..., Served]) -> None:
    served = make_service(max_wait_ms=300.0, max_batch_size=8)
    statuses: list[int] = []

    def one() -> None:
        statuses.append(_predict(served).status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    metrics = served.client.get("/metrics").text
    count = [m for m in metrics.splitlines() if m.startswith("kgdx_batch_size_count")]
    total = [m for m in metrics.splitlines() if m.startswith("kgdx_batch_size_sum")]
    batches, items = float(count[0].split()[-1]), float(total[0].split()[-1])
    assert items == 6 and batches < 6, (batches, items)


def test_full_queue_answers_503_with_retry_after(
    make_service: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    slow = InferencePipeline.run_batch

    def run_batch(self: InferencePipeline, requests: list) -> list:  # type: ignore[type-arg]
        time.sleep(0.4)
        return slow(self, requests)

    monkeypatch.setattr(InferencePipeline, "run_batch", run_batch)
    served = make_service(max_queue=1, max_batch_size=1, max_wait_ms=0.0)
    responses: list = []  # type: ignore[type-arg]

    def one() -> None:
        responses.append(_predict(served))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "overloaded"


def test_logs_and_errors_carry_no_patient_data(
    served: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    planted_name, planted_id = "Zqxjv^Plantedname", "PID-77331199"
    dcm = images.dicom_bytes(
        PatientName=planted_name,
        PatientID=planted_id,
        AccessionNumber="ACC-5511",
        PatientBirthDate="19010101",
    )
    caplog.set_level(logging.DEBUG)
    ok = _predict(served, dcm, "planted.dcm")
    bad = _predict(served, images.truncated(dcm, 0.9), "planted-cut.dcm")
    nopix = images.no_pixel_dicom_bytes()
    bad2 = _predict(served, nopix, "nopix.dcm")
    bodies = ok.text + bad.text + bad2.text
    logged = caplog.text + "".join(capfd.readouterr())
    for secret in ("Zqxjv", "Plantedname", planted_id, "ACC-5511", "19010101"):
        assert secret not in bodies and secret not in logged
    for key in served.keys.values():
        assert key not in logged
    assert ok.status_code == 200
    assert json.loads(ok.text)["image"]["modality"] == "DX"


def test_audit_records_each_request(served: Served) -> None:
    from service.audit import AuditLog
    from service.db import ServiceDatabase

    _predict(served)
    served.client.get("/v1/ontologies")
    audit = served.client.app.state.kgdx.audit  # type: ignore[attr-defined]
    assert audit.flush(10)  # rows are committed by the audit writer thread
    db = ServiceDatabase()
    try:
        rows = AuditLog(db).recent(10)
    finally:
        db.close()
    routes = [(r["route"], r["status"]) for r in rows]
    assert ("/v1/predict", 200) in routes and ("/v1/ontologies", 401) in routes
    predicted = next(r for r in rows if r["route"] == "/v1/predict")
    assert predicted["model_version"] and predicted["ontology_version"]
    assert predicted["key_id"]


def test_not_ready_without_a_checkpoint(make_service: Callable[..., Served], tmp_path) -> None:
    served = make_service(checkpoint=tmp_path / "missing")
    r = served.client.get("/readyz")
    _assert_error(r, 503, "checkpoint")
    _assert_error(_predict(served), 503, "")
    assert served.client.get("/healthz").status_code == 200


def test_evidence_ranking_is_a_setting(make_service: Callable[..., Served]) -> None:
    """KGDX_EVIDENCE picks how evidence ranks (attention by default: it needs no backward
    pass); the scores are the same either way, the evidence differs, and relevances stay
    shares in [0, 1]."""
    from pydantic import ValidationError

    from service.settings import Settings

    attention = make_service()
    attributed = make_service(evidence="attribution")
    assert attributed.client.app.state.kgdx.predictor.evidence == "attribution"
    assert attention.client.app.state.kgdx.predictor.evidence == "attention"
    a, b = _predict(attributed).json(), _predict(attention).json()
    assert [f["probability"] for f in a["findings"]] == [f["probability"] for f in b["findings"]]
    for body in (a, b):
        for f in body["findings"]:
            assert all(0.0 <= e["relevance"] <= 1.0 for e in f["evidence"])
            assert sum(e["relevance"] for e in f["evidence"]) <= 1.0 + 1e-5

    def evidence(body: dict) -> list:
        return [
            [(e["concept"]["id"], e["relevance"]) for e in f["evidence"]] for f in body["findings"]
        ]

    assert evidence(a) != evidence(b)
    with pytest.raises(ValidationError, match="evidence"):
        Settings(evidence="saliency")
