"""The fast grayscale PNG writer: what Pillow reads back is the image, bit for bit; and the
check for a plain grayscale PNG (pixels and nothing else)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.png import gray_png, is_plain_gray_png


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


SIZE = (40, 30)  # width, height of the PNGs below


def _pil_png(mode: str, **save: object) -> bytes:
    image = Image.new(mode, SIZE) if mode != "L" else Image.linear_gradient("L").resize(SIZE)
    out = io.BytesIO()
    image.save(out, format="PNG", **save)
    return out.getvalue()


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _with_ihdr(data: bytes, **fields: int) -> bytes:
    """``data`` with IHDR's bit depth, colour type or interlace byte replaced (CRC redone)."""
    ihdr = bytearray(data[16:29])
    for name, offset in (("depth", 8), ("color", 9), ("interlace", 12)):
        if name in fields:
            ihdr[offset] = fields[name]
    return data[:8] + _chunk(b"IHDR", bytes(ihdr)) + data[33:]


def _before_iend(data: bytes, *chunks: bytes) -> bytes:
    return data[:-12] + b"".join(chunks) + data[-12:]


def _plain(data: bytes) -> bool:
    return is_plain_gray_png(data, *SIZE)


def test_plain_gray_pngs_are_recognised() -> None:
    assert is_plain_gray_png(gray_png(np.zeros((3, 5), np.uint8)), 5, 3)
    assert _plain(_pil_png("L"))
    assert _plain(_with_ihdr(_pil_png("L"), interlace=0))  # a CRC redone is fine
    assert _plain(_before_iend(_pil_png("L"), *[_chunk(b"IDAT", b"")] * 10))


def _text_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Doe^Jane 1970-01-01")
    return _pil_png("L", pnginfo=info)


def _bad_crc() -> bytes:
    data = bytearray(_pil_png("L"))
    data[-5] ^= 0xFF  # the IEND CRC's last byte
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_text_png(), id="text chunk"),
        pytest.param(_pil_png("L", dpi=(72, 72)), id="pHYs chunk"),
        pytest.param(_pil_png("RGB"), id="RGB"),
        pytest.param(_pil_png("I;16"), id="16-bit"),
        pytest.param(_pil_png("1"), id="1-bit"),
        pytest.param(_with_ihdr(_pil_png("L"), interlace=1), id="interlaced"),
        pytest.param(_pil_png("L") + b"Doe^Jane", id="bytes after IEND"),
        pytest.param(_pil_png("L")[:-12], id="no IEND"),
        pytest.param(_pil_png("L")[:-20], id="truncated"),
        pytest.param(_bad_crc(), id="bad CRC"),
        pytest.param(
            _before_iend(_pil_png("L"), _chunk(b"IDAT", bytes(8000))), id="more than pixels"
        ),
        pytest.param(
            _before_iend(_pil_png("L"), *[_chunk(b"IDAT", b"")] * 300), id="too many chunks"
        ),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xd8\xff\xe0" + bytes(64), id="JPEG"),
    ],
)
def test_anything_else_is_not_plain(data: bytes) -> None:
    assert not _plain(data)


def test_the_size_must_be_the_decoded_one() -> None:
    assert not is_plain_gray_png(_pil_png("L"), SIZE[1], SIZE[0])
