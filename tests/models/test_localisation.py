"""Localisation: bounding-box file and join, box scaling, pointing game, IoBB, report."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from models.errors import DataError
from models.localisation import (
    Box,
    LocalisationResult,
    boxes_on_images,
    cxr_image_name,
    heatmap_peak,
    image_sizes_from_rows,
    iobb,
    localisation_report,
    localise,
    pointing_game,
    predicted_region,
    read_bbox_csv,
    scale_box,
    upsample_heatmap,
    wilson_ci,
)
from models.transforms import Preprocess

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BBOX = DATA / "nih_metadata" / "BBox_List_2017.csv.gz"
LABELS = DATA / "cxr" / "labels.csv"

# the real file's header: the box spans four columns, then three empty ones
HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def _bbox_file(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "boxes.csv.gz"
    path.write_bytes(gzip.compress((header + body).encode()))
    return path


# ---------------------------------------------------------------------------------------------
# File and join
# ---------------------------------------------------------------------------------------------


def test_read_bbox_csv_maps_names(tmp_path: Path) -> None:
    path = _bbox_file(
        tmp_path,
        "00013118_008.png,Atelectasis,225.08,547.02,86.78,79.19\n"
        "00000001_000.png,Infiltrate,0,0,1024,512\n",
    )
    a, b = read_bbox_csv(path)
    assert a.image == "nih_00013118_008.png" and a.original == "00013118_008.png"
    assert a.finding == "Atelectasis" and a.box == Box(225.08, 547.02, 86.78, 79.19)
    assert b.finding == "Infiltration"
    assert cxr_image_name("00013118_008.png") == "nih_00013118_008.png"


@pytest.mark.parametrize(
    ("header", "body", "match"),
    [
        ("Image,Finding Label,x,y,w,h\n", "", "missing column\\(s\\) Image Index"),
        (HEADER, "a.png,Mass,1,2,three,4\n", "line 2: bad row"),
        (HEADER, "a.png,Mass,1,2,-3,4\n", "line 2: bad row"),
    ],
)
def test_read_bbox_csv_errors(tmp_path: Path, header: str, body: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        read_bbox_csv(_bbox_file(tmp_path, body, header))


def test_read_bbox_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_bbox_csv(tmp_path / "nope.csv.gz")


@pytest.mark.skipif(not (BBOX.is_file() and LABELS.is_file()), reason="no ../shared/data")
def test_real_boxes_join_cxr_images() -> None:
    annotations = read_bbox_csv(BBOX)
    assert len(annotations) == 984
    assert {a.finding for a in annotations} == {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    }
    with open(LABELS, newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    boxes = boxes_on_images(annotations, image_sizes_from_rows(rows.values()))
    assert sum(len(v) for v in boxes.values()) == 873
    assert len({image for image, _ in boxes}) == 784
    for (image, finding), found in boxes.items():
        assert rows[image][finding] == "1"  # every box is on a positive label
        side = int(rows[image]["w"])
        assert all(b.x >= 0 and b.x2 <= side + 1e-6 for b in found)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [(256, Box(25.0, 50.0, 12.5, 25.0)), (64, Box(6.25, 12.5, 3.125, 6.25)), ((512, 256), None)],
)
def test_scale_box(image_size, expected) -> None:
    box = Box(100, 200, 50, 100)
    out = scale_box(box, 1024, image_size)
    if expected is None:  # (height, width)
        assert out == Box(25.0, 100.0, 12.5, 50.0)
    else:
        assert out == expected


def test_box_through_letterbox_to_model_input() -> None:
    geo = Preprocess(128).geometry(256, 256)
    on_image = scale_box(Box(512, 512, 256, 128), 1024, 256)
    assert Box(*geo.box_to_model(on_image.as_tuple())) == Box(64, 64, 32, 16)


# ---------------------------------------------------------------------------------------------
# Pointing game
# ---------------------------------------------------------------------------------------------


def _one_hot(rows: int, cols: int, r: int, c: int) -> np.ndarray:
    h = np.zeros((rows, cols))
    h[r, c] = 1.0
    return h


@pytest.mark.parametrize(
    ("cell", "box", "hit"),
    [
        ((1, 2), Box(16, 8, 8, 8), True),  # centre (20, 12) inside
        ((1, 2), Box(0, 0, 8, 8), False),
        ((0, 0), Box(4, 4, 1, 1), True),  # centre (4, 4) on the corner: edges count
        ((3, 3), Box(0, 0, 27.9, 27.9), False),  # centre (28, 28) just outside
    ],
)
def test_pointing_game_peak_inside_or_outside(cell, box: Box, hit: bool) -> None:
    assert pointing_game(_one_hot(4, 4, *cell), box, 32) is hit


def test_pointing_game_tolerance_ties_and_several_boxes() -> None:
    h = _one_hot(4, 4, 3, 3)
    assert not pointing_game(h, Box(0, 0, 27.9, 27.9), 32)
    assert pointing_game(h, Box(0, 0, 27.9, 27.9), 32, tolerance=0.2)
    assert heatmap_peak(np.ones((3, 3))) == (0, 0)  # ties: first in row-major order
    assert pointing_game(h, [Box(0, 0, 2, 2), Box(26, 26, 4, 4)], 32)
    assert pointing_game(_one_hot(2, 4, 1, 0), Box(0, 16, 8, 16), (32, 32))  # rows != cols


def test_pointing_agrees_with_upsampled_argmax_for_interior_peaks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        h = rng.random((6, 6)) * 0.5
        r, c = rng.integers(1, 5, size=2)
        h[r, c] = 1.0
        up = upsample_heatmap(h, 48)
        ur, uc = np.unravel_index(int(np.argmax(up)), up.shape)
        # the upsampled maximum sits at the peak cell's centre (8 px cells: 4 px from edges)
        assert (ur // 8, uc // 8) == (r, c)


def test_upsample_heatmap() -> None:
    assert np.allclose(upsample_heatmap(np.full((4, 4), 0.3), 32), 0.3)
    h = np.random.default_rng(1).random((16, 16))
    assert np.allclose(upsample_heatmap(h, 16), h)  # same size: identity
    with pytest.raises(ValueError, match="2-D"):
        upsample_heatmap(np.zeros((2, 2, 2)), 8)


# ---------------------------------------------------------------------------------------------
# IoBB
# ---------------------------------------------------------------------------------------------


def _blocks(*blocks: tuple[int, int, int, int, float], size: int = 16) -> np.ndarray:
    """A full-resolution map (upsampling is then the identity) with rectangular blocks
    ``(row0, col0, rows, cols, value)``."""
    h = np.zeros((size, size))
    for r0, c0, nr, nc, v in blocks:
        h[r0 : r0 + nr, c0 : c0 + nc] = v
    return h


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        (Box(4, 4, 4, 4), 1.0),  # the box is the region
        (Box(6, 6, 4, 4), 0.25),  # 2 x 2 of the 4 x 4 region
        (Box(0, 0, 2, 2), 0.0),
        (Box(5.5, 4, 1, 4), 0.25),  # fractional overlap: 1 x 4 of 16
        (Box(0, 0, 16, 16), 1.0),
    ],
)
@pytest.mark.parametrize("shape", ["box", "mask"])
def test_iobb_exact_values(box: Box, expected: float, shape: str) -> None:
    h = _blocks((4, 4, 4, 4, 1.0))
    assert iobb(h, box, 16, shape=shape) == pytest.approx(expected)


def test_iobb_region_choice() -> None:
    # a large weak component (rows 8-13, cols 8-13, value 0.6) and a small strong one
    h = _blocks((0, 0, 2, 2, 1.0), (8, 8, 6, 6, 0.6))
    gt = Box(0, 0, 2, 2)
    assert iobb(h, gt, 16, region="largest") == 0.0
    assert iobb(h, gt, 16, region="peak") == 1.0
    # all: mask 4 + 36 px; its bounding box is 14 x 14
    assert iobb(h, gt, 16, region="all", shape="mask") == pytest.approx(4 / 40)
    assert iobb(h, gt, 16, region="all", shape="box") == pytest.approx(4 / 196)
    # a threshold above 0.6 keeps only the strong block
    assert iobb(h, gt, 16, threshold=0.7) == 1.0
    assert iobb(h, [Box(14, 14, 2, 2), gt], 16, threshold=0.7) == 1.0  # best box


def test_predicted_region_flat_map_and_validation() -> None:
    assert predicted_region(np.zeros((4, 4)), 8).all()
    with pytest.raises(ValueError, match="threshold"):
        predicted_region(np.zeros((4, 4)), 8, threshold=1.5)
    with pytest.raises(ValueError, match="region"):
        predicted_region(np.zeros((4, 4)), 8, region="biggest")
    with pytest.raises(ValueError, match="shape"):
        iobb(np.zeros((4, 4)), Box(0, 0, 1, 1), 8, shape="circle")


def test_coarse_heatmap_iobb_is_plausible() -> None:
    # a 4 x 4 map over 32 px with a hot cell (1, 1): region around (12, 12)
    h = _one_hot(4, 4, 1, 1)
    assert iobb(h, Box(8, 8, 8, 8), 32) == pytest.approx(1.0)
    assert 0 < iobb(h, Box(12, 12, 8, 8), 32) < 0.5


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def test_localise_and_report() -> None:
    h = _blocks((4, 4, 4, 4, 1.0))
    results = [
        localise("a.png", "Mass", h, Box(4, 4, 4, 4), 16),  # hit, IoBB 1
        localise("b.png", "Mass", h, Box(6, 6, 4, 4), 16),  # peak (4, 4) -> (4.5, 4.5): miss
        localise("c.png", "Nodule", h, Box(0, 0, 2, 2), 16),  # miss, IoBB 0
    ]
    assert results[0] == LocalisationResult("a.png", "Mass", True, 1.0)
    assert results[1].pointing is False and results[1].iobb == pytest.approx(0.25)
    report = localisation_report(results)
    mass = report["Mass"]
    assert (mass["pointing"], mass["iobb_0_1"], mass["iobb_0_25"], mass["n"]) == (0.5, 1.0, 0.5, 2)
    lo, hi = mass["pointing_ci"]
    assert 0 < lo < 0.5 < hi < 1
    assert report["Nodule"]["pointing"] == 0.0 and report["Nodule"]["n"] == 1
    assert report["overall"]["n"] == 3 and report["overall"]["pointing"] == pytest.approx(1 / 3)
    assert "overall" not in localisation_report(results, include_overall=False)
    assert localisation_report([]) == {
        "overall": {
            "pointing": None,
            "pointing_ci": [None, None],
            "iobb_0_1": None,
            "iobb_0_1_ci": [None, None],
            "iobb_0_25": None,
            "iobb_0_25_ci": [None, None],
            "mean_iobb": None,
            "n": 0,
        }
    }


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (37, 120)])
def test_wilson_interval(k: int, n: int) -> None:
    lo, hi = wilson_ci(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    # the closed form (Wilson 1927)
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-9)
