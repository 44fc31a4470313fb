"""Explanations: heat-map normalisation and mapping to the original image, evidence ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kg.tensors import GraphArrays
from models.explain import (
    explain_output,
    heatmap_on_original,
    normalise_heatmap,
    rank_evidence,
)
from models.localisation import upsample_heatmap
from models.outputs import KgdxOutput
from models.transforms import Geometry, Preprocess
from tests.models.tiny_checkpoint import tiny_model

ENTITIES = ["C:a", "C:b", "C:c", "C:d"]
LABELS = {"C:a": "Alpha", "C:b": "Beta", "C:c": "Gamma"}  # C:d has no label: shows its id


def _output() -> KgdxOutput:
    """One image, two findings (C:a, C:b), a 2 x 3 patch grid, four entities."""
    patch = torch.tensor(
        [
            [
                [0.05, 0.10, 0.40, 0.15, 0.20, 0.10],  # peak at (0, 2)
                [1 / 6] * 6,  # flat
            ]
        ]
    )
    relevance = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.1, 0.3]]])
    logits = torch.tensor([[0.0, 2.0]])
    return KgdxOutput(
        logits=logits,
        probabilities=torch.sigmoid(logits),
        patch_attention=patch,
        grid=(2, 3),
        entity_relevance=relevance,
        concept_ids=["C:a", "C:b"],
        entity_ids=list(ENTITIES),
    )


def test_heatmap_values_peak_and_normalisation() -> None:
    geo = Preprocess(32).geometry(20, 40)
    (image,) = explain_output(_output(), LABELS, names=["A", "B"], geometries=[geo], top_k=3)
    a, b = image.findings
    assert (a.name, a.concept_id, a.label) == ("A", "C:a", "Alpha")
    assert a.probability == pytest.approx(0.5)
    assert a.heatmap.rows == 2 and a.heatmap.cols == 3
    expected = (np.array([0.05, 0.10, 0.40, 0.15, 0.20, 0.10]) - 0.05) / 0.35
    np.testing.assert_allclose(a.heatmap.values.ravel(), expected, rtol=1e-5)
    assert a.heatmap.values.min() == 0 and a.heatmap.values.max() == pytest.approx(1.0)
    assert a.heatmap.peak == (0, 2) and a.heatmap.max_attention == pytest.approx(0.4)
    # a flat map points nowhere
    assert (b.heatmap.values == 0).all() and b.heatmap.peak == (0, 0)
    # the grid spans the padded 32 px input: 20 x 40 image, 16 x 32 content, 8 px pad
    assert a.heatmap.extent == pytest.approx((0.0, -10.0, 40.0, 30.0))
    assert a.heatmap.peak_original() == geo.cell_to_original(0, 2, (2, 3))
    assert a.threshold is None and a.positive is None


def test_evidence_ranking_ties_and_flags() -> None:
    (image,) = explain_output(_output(), LABELS, top_k=10, target_ids=["C:a", "C:b", "C:c"])
    a, b = image.findings
    assert [e.concept_id for e in a.evidence] == ["C:d", "C:c", "C:b", "C:a"]
    assert [e.relevance for e in a.evidence] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert [e.is_self for e in a.evidence] == [False, False, False, True]
    assert [e.is_target for e in a.evidence] == [False, True, True, True]
    assert a.evidence[0].label == "C:d"  # no label known
    # ties keep the lower entity index first
    assert [e.concept_id for e in b.evidence] == ["C:a", "C:b", "C:d", "C:c"]
    assert b.evidence[1].is_self
    assert b.relevance_map() == pytest.approx({"C:a": 0.3, "C:d": 0.3, "C:c": 0.1})
    assert "C:b" in b.relevance_map(include_self=True)
    (top2,) = explain_output(_output(), LABELS, top_k=2)
    assert [e.concept_id for e in top2.findings[0].evidence] == ["C:d", "C:c"]


def test_findings_subset_thresholds_and_json() -> None:
    (image,) = explain_output(
        _output(), LABELS, findings=[1], thresholds=[0.5, 0.9], image_ids=["img-1"]
    )
    assert [f.concept_id for f in image.findings] == ["C:b"]
    finding = image.finding("C:b")
    assert finding.threshold == 0.9 and finding.positive is False
    data = json.loads(json.dumps(image.to_dict()))
    assert data["image_id"] == "img-1" and data["grid"] == [2, 3] and data["geometry"] is None
    heat = data["findings"][0]["heatmap"]
    assert heat["rows"] == 2 and len(heat["values"]) == 2 and len(heat["values"][0]) == 3
    assert "extent" not in heat  # no geometry given
    with pytest.raises(KeyError, match="no finding"):
        image.finding("C:a")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["A"]}, "names has 1 entries"),
        ({"geometries": []}, "geometries has 0 entries"),
        ({"findings": [2]}, "outside"),
        ({"thresholds": [0.5]}, "thresholds has 1"),
    ],
)
def test_explain_refuses_mismatched_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        explain_output(_output(), LABELS, **kwargs)  # type: ignore[arg-type]


def test_normalise_heatmap_batches() -> None:
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    out = normalise_heatmap(maps)
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.25, 1.0]])
    assert (out[1] == 0).all() and out.dtype == np.float32
    with pytest.raises(ValueError, match="2-D"):
        normalise_heatmap(np.zeros(3))


def _bilinear(values: np.ndarray, x: float, y: float, size: int) -> float:
    """Reference: bilinear read of a map spanning [0, size)^2 at a model point, with cell
    centres at (j + 0.5) * size / cols and border clamping."""
    rows, cols = values.shape
    u = min(max(x * cols / size - 0.5, 0.0), cols - 1.0)
    v = min(max(y * rows / size - 0.5, 0.0), rows - 1.0)
    j0, i0 = int(np.floor(u)), int(np.floor(v))
    j1, i1 = min(j0 + 1, cols - 1), min(i0 + 1, rows - 1)
    fu, fv = u - j0, v - i0
    top = values[i0, j0] * (1 - fu) + values[i0, j1] * fu
    bottom = values[i1, j0] * (1 - fu) + values[i1, j1] * fu
    return float(top * (1 - fv) + bottom * fv)


@pytest.mark.parametrize(("height", "width"), [(20, 40), (48, 30), (7, 7)])
def test_heatmap_on_original_samples_the_letterboxed_map(height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    values = rng.random((4, 4)).astype(np.float32)
    geo = Preprocess(32).geometry(height, width)
    out = heatmap_on_original(values, geo)
    assert out.shape == (height, width)
    for i, j in [(0, 0), (height - 1, width - 1), (height // 2, width // 3)]:
        x, y = geo.to_model(j + 0.5, i + 0.5)
        assert out[i, j] == pytest.approx(_bilinear(values, x, y, 32), abs=1e-5)


def test_heatmap_on_original_equals_upsampling_without_letterbox() -> None:
    values = np.random.default_rng(1).random((4, 4)).astype(np.float32)
    geo = Geometry(32, 32, 32, 1.0, 1.0, 0, 0)
    np.testing.assert_allclose(
        heatmap_on_original(values, geo), upsample_heatmap(values, 32), atol=1e-5
    )


def test_rank_evidence_excludes() -> None:
    rel = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1]])
    idx, vals = rank_evidence(rel, 2, exclude=[0])
    assert idx.tolist() == [[1, 2], [2, 1]]
    torch.testing.assert_close(vals, torch.tensor([[0.2, 0.2], [0.7, 0.1]]))
    mask = torch.tensor([[False, False, False, True], [False, False, True, False]])
    assert rank_evidence(rel, 3, exclude=mask)[0].tolist() == [[0, 1, 2], [0, 1, 3]]
    assert rank_evidence(rel, 10, exclude=[0, 1])[0].shape == (2, 2)
    with pytest.raises(ValueError, match="top_k"):
        rank_evidence(rel, -1)


def test_explanations_of_a_real_model_output(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = tiny_model(arrays, features)
    pre = Preprocess(32)
    images = [np.random.default_rng(i).random((24, 32), dtype=np.float32) for i in range(2)]
    pairs = [pre.with_geometry(im) for im in images]
    with torch.no_grad():
        out = model(torch.stack([x for x, _ in pairs]))
    labels = dict(zip(arrays.node_ids, arrays.node_labels, strict=True))
    explained = explain_output(out, labels, geometries=[g for _, g in pairs], top_k=3)
    for i, image in enumerate(explained):
        for c, finding in enumerate(image.findings):
            heat = finding.heatmap
            assert heat.values.shape == out.grid
            assert heat.values.min() >= 0 and heat.values.max() == pytest.approx(1.0)
            peak = divmod(int(out.patch_attention[i, c].argmax()), out.grid[1])
            assert heat.peak == peak
            rel = [e.relevance for e in finding.evidence]
            assert rel == sorted(rel, reverse=True) and len(rel) == 3
            assert rel[0] == pytest.approx(float(out.entity_relevance[i, c].max()))
            assert heat.on_original().shape == (24, 32)


REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr" / "images"


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/cxr is not available")
def test_real_radiographs_map_back_to_their_pixels(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    from models.data import load_image

    names = ["kermany_IM-0115-0001.png", "nih_00029548_010.png"]  # 228 x 256, 256 x 256
    images = [load_image(REAL / n) for n in names]  # read-only
    model = tiny_model(arrays, features)
    pre = Preprocess(32)
    pairs = [pre.with_geometry(im) for im in images]
    with torch.no_grad():
        out = model(torch.stack([x for x, _ in pairs]))
    labels = dict(zip(arrays.node_ids, arrays.node_labels, strict=True))
    explained = explain_output(out, labels, geometries=[g for _, g in pairs], image_ids=names)
    for image, pixels in zip(explained, images, strict=True):
        heat = image.findings[0].heatmap
        assert heat.on_original().shape == pixels.shape
        x0, y0, x1, y1 = heat.extent or (0, 0, 0, 0)
        h, w = pixels.shape
        # the grid covers the image exactly along its longer side
        if w >= h:
            assert (x0, x1) == pytest.approx((0, w), abs=1e-6) and y0 <= 0 and y1 >= h
        else:
            assert (y0, y1) == pytest.approx((0, h), abs=1e-6) and x0 <= 0 and x1 >= w
