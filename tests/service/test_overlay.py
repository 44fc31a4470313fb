"""Heat-map overlays: a valid PNG of the right size, the hot colour where the peak is."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from models.explain import heatmap_on_original
from models.transforms import Preprocess
from service.overlay import _lut, heat_on_image, heatmap_overlay_png


def _open(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(BytesIO(png)) as image:
        image.verify()
    with Image.open(BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _peaked(rows: int, cols: int, row: int, col: int) -> np.ndarray:
    heat = np.zeros((rows, cols), dtype=np.float32)
    heat[row, col] = 1.0
    return heat


def _colour_strength(rgb: np.ndarray, gray: float) -> np.ndarray:
    """How far each output pixel is from the plain gray image."""
    return np.abs(rgb.astype(np.float32) - gray * 255.0).sum(axis=-1)


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [
        ((48, 64), 1024, (48, 64)),
        ((300, 200), 100, (100, 67)),
        ((2000, 1000), 1024, (1024, 512)),
        ((17, 17), 8, (8, 8)),
    ],
)
def test_output_is_a_png_of_the_expected_size(
    shape: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random(shape, dtype=np.float32)
    heat = rng.random((7, 7), dtype=np.float32)
    rgb = _open(heatmap_overlay_png(pixels, heat, max_side=max_side))
    assert rgb.shape == (*expected, 3)


@pytest.mark.parametrize(("row", "col"), [(0, 0), (1, 3), (3, 2), (3, 3)])
def test_the_hot_region_is_where_the_peak_is(row: int, col: int) -> None:
    pixels = np.full((80, 120), 0.5, dtype=np.float32)
    rgb = _open(heatmap_overlay_png(pixels, _peaked(4, 4, row, col)))
    strength = _colour_strength(rgb, 0.5)
    y, x = np.unravel_index(int(np.argmax(strength)), strength.shape)
    # the peak cell covers rows [row*20, row*20+20) and columns [col*30, col*30+30)
    assert row * 20 <= y < row * 20 + 20
    assert col * 30 <= x < col * 30 + 30
    # far from the peak the image shows unchanged
    far_y, far_x = (79 if row < 2 else 0), (119 if col < 2 else 0)
    assert strength[far_y, far_x] < 3.0


def test_hot_is_the_bright_end_of_the_colormap() -> None:
    pixels = np.zeros((32, 32), dtype=np.float32)
    heat = np.zeros((2, 2), dtype=np.float32)
    heat[0, 0] = 1.0
    rgb = _open(heatmap_overlay_png(pixels, heat, alpha=1.0))
    np.testing.assert_allclose(rgb[0, 0], _lut("inferno")[255], atol=1)  # bright yellow
    assert rgb[-1, -1].sum() <= 3  # no heat on black stays black


@pytest.mark.parametrize("alpha", [0.0, 0.45, 1.0])
def test_alpha_scales_the_colour(alpha: float) -> None:
    pixels = np.full((16, 16), 0.25, dtype=np.float32)
    heat = np.ones((2, 2), dtype=np.float32)
    rgb = _open(heatmap_overlay_png(pixels, heat, alpha=alpha)).astype(np.float32)
    expected = 0.25 * 255 * (1 - alpha) + alpha * _lut("inferno")[255]
    np.testing.assert_allclose(rgb[8, 8], expected, atol=1.0)


@pytest.mark.parametrize(("height", "width"), [(48, 96), (96, 48), (50, 50), (31, 77)])
def test_geometry_maps_the_model_grid_back_like_the_reference(height: int, width: int) -> None:
    geometry = Preprocess(64).geometry(height, width)
    rng = np.random.default_rng(1)
    heat = rng.random((8, 8), dtype=np.float32)
    ours = heat_on_image(heat, height, width, geometry)
    reference = heatmap_on_original(heat, geometry)  # torch grid_sample
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_geometry_puts_the_peak_on_the_letterboxed_image() -> None:
    height, width = 60, 180  # wide: padding above and below in the model input
    geometry = Preprocess(64).geometry(height, width)
    grid = (8, 8)
    row, col = 4, 6  # a cell inside the image region
    pixels = np.full((height, width), 0.5, dtype=np.float32)
    rgb = _open(heatmap_overlay_png(pixels, _peaked(*grid, row, col), geometry=geometry))
    strength = _colour_strength(rgb, 0.5)
    y, x = np.unravel_index(int(np.argmax(strength)), strength.shape)
    px, py = geometry.cell_to_original(row, col, grid)
    cell_w, cell_h = (
        geometry.size / grid[1] / geometry.scale_x,
        geometry.size / grid[0] / geometry.scale_y,
    )
    assert abs(x + 0.5 - px) <= cell_w / 2
    assert abs(y + 0.5 - py) <= cell_h / 2


def test_geometry_of_the_original_works_on_a_thumbnail() -> None:
    geometry = Preprocess(64).geometry(400, 200)
    heat = np.random.default_rng(2).random((8, 8), dtype=np.float32)
    full = heat_on_image(heat, 400, 200, geometry)
    thumb = heat_on_image(heat, 100, 50, geometry)
    np.testing.assert_allclose(thumb, full[2::4, 2::4], atol=0.05)


def test_bad_values_are_cleaned_not_fatal() -> None:
    pixels = np.full((20, 20), 2.0, dtype=np.float32)
    pixels[0, 0] = np.nan
    heat = np.array([[np.nan, -1.0], [5.0, 0.5]], dtype=np.float32)
    rgb = _open(heatmap_overlay_png(pixels, heat))
    assert rgb.shape == (20, 20, 3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pixels": np.zeros((4, 4, 3))}, "pixels"),
        ({"heatmap": np.zeros(5)}, "heatmap"),
        ({"heatmap": np.zeros((0, 3))}, "heatmap"),
        ({"alpha": 1.5}, "alpha"),
        ({"max_side": 0}, "max_side"),
        ({"colormap": "no-such-map"}, "colormap"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"pixels": np.zeros((8, 8)), "heatmap": np.zeros((2, 2))}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        heatmap_overlay_png(**args)  # type: ignore[arg-type]
