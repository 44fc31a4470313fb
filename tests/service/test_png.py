"""The fast grayscale PNG writer: what Pillow reads back is the image, bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.png import gray_png


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (194, 256), (512, 300)])
def test_round_trip(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(gray_png(image)))
    decoded.load()  # checks every chunk's CRC and the zlib stream
    assert decoded.mode == "L" and decoded.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(decoded), image)


def test_smooth_images_compress() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    assert len(gray_png(ramp)) < ramp.size // 20  # the Sub filter turns a ramp into ones


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)],
)
def test_refuses_what_it_cannot_write(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        gray_png(bad)
