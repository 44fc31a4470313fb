"""Properties of the ``decode`` stage (:func:`service.decode.decode_image`).

Whatever bytes come in (arbitrary bytes, bytes behind a real magic number, real DICOM / PNG /
JPEG files truncated or with bytes overwritten), ``decode_image`` either returns a valid
image (``(height, width)`` float32, C-contiguous, finite, in [0, 1], sides at least
``min_side``) or raises one of its declared errors (:class:`UnprocessableImageError`,
:class:`PayloadTooLargeError`, :class:`UnsupportedMediaTypeError`), never anything else.
Valid images generated with pydicom and Pillow at random sizes, bit depths, photometric
interpretations, frame counts, windows, rescales and Pillow modes decode to their shape.

Each property runs a bounded, derandomized number of examples (a few seconds each).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from service.decode import DecodedImage, DecodeLimits, decode_image
from service.errors import (
    PayloadTooLargeError,
    UnprocessableImageError,
    UnsupportedMediaTypeError,
)
from tests.service import images

# pydicom warns about every odd value it meets in a mutated file; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DECLARED = (UnprocessableImageError, PayloadTooLargeError, UnsupportedMediaTypeError)
LIMITS = DecodeLimits(max_bytes=2**20, max_pixels=200_000, min_side=16)

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

sides = st.integers(LIMITS.min_side, 72)


def assert_valid(result: DecodedImage, limits: DecodeLimits = LIMITS) -> None:
    pixels = result.pixels
    assert pixels.ndim == 2 and pixels.dtype == np.float32 and pixels.flags.c_contiguous
    assert pixels.shape == (result.height, result.width)
    assert min(pixels.shape) >= limits.min_side
    assert pixels.size <= limits.max_pixels
    assert np.isfinite(pixels).all()
    assert 0.0 <= float(pixels.min()) <= float(pixels.max()) <= 1.0


def decode_or_declared(data: bytes, limits: DecodeLimits = LIMITS) -> DecodedImage | None:
    """The decoded image, or None when a declared error refused ``data``."""
    try:
        result = decode_image(data, content_type="application/octet-stream", limits=limits)
    except DECLARED:
        return None
    assert_valid(result, limits)
    return result


# -- generated valid images ---------------------------------------------------------------------


def _pixels(rows: int, cols: int, bits: int) -> st.SearchStrategy[np.ndarray]:
    """Any stored values of ``bits`` bits, constant images and extremes included."""
    dtype = np.uint8 if bits <= 8 else np.uint16
    return hnp.arrays(
        dtype, (rows, cols), elements=st.integers(0, 2**bits - 1), fill=st.integers(0, 2**bits - 1)
    )


@st.composite
def dicom_files(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A valid DICOM image (Part 10, or a bare dataset) and its rows and columns."""
    rows, cols = draw(sides), draw(sides)
    photometric = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB"]))
    frames = draw(st.integers(1, 3))
    kwargs: dict[str, object] = {}
    if photometric == "RGB":
        bits = 8
        kwargs["seed"] = draw(st.integers(0, 2**16))
    else:
        bits = draw(st.sampled_from([8, 10, 12, 16]))
        frame = draw(_pixels(rows, cols, bits))
        kwargs["pixels"] = np.stack([frame] * frames) if frames > 1 else frame
        if draw(st.booleans()):
            kwargs["window"] = (
                draw(st.floats(-2000, 70_000, allow_nan=False)),
                draw(st.floats(1, 70_000, allow_nan=False)),
            )
        if draw(st.booleans()):
            kwargs["rescale"] = (
                draw(st.sampled_from([0.5, 1.0, 2.0, -1.0])),
                draw(st.sampled_from([-1024.0, 0.0, 100.0])),
            )
    compression = draw(st.sampled_from(["none", "none", "rle"]))
    ds = images.dicom_dataset(
        photometric=photometric,
        rows=rows,
        columns=cols,
        bits=bits,
        frames=frames,
        compression=compression,
        modality=draw(st.sampled_from(["DX", "CR", "OT"])),
        **kwargs,  # type: ignore[arg-type]
    )
    # Fixed UIDs: generated ones vary in length, and hypothesis needs the same bytes each time.
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    preamble = compression != "none" or draw(st.booleans())
    return images.write_dicom(ds, preamble=preamble), rows, cols


@st.composite
def pillow_files(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A valid PNG / JPEG / TIFF / BMP / GIF in one of Pillow's modes, its height and width."""
    rows, cols = draw(sides), draw(sides)
    fmt, mode = draw(
        st.sampled_from(
            [
                ("PNG", "L"),
                ("PNG", "I;16"),
                ("PNG", "RGB"),
                ("PNG", "RGBA"),
                ("PNG", "LA"),
                ("PNG", "P"),
                ("PNG", "1"),
                ("JPEG", "L"),
                ("JPEG", "RGB"),
                ("TIFF", "L"),
                ("BMP", "RGB"),
                ("GIF", "P"),
            ]
        )
    )
    if mode == "I;16":
        image = Image.fromarray(draw(_pixels(rows, cols, draw(st.sampled_from([8, 12, 16])))))
        image = image if image.mode == "I;16" else image.convert("I;16")
    else:
        gray = draw(_pixels(rows, cols, 8))
        image = Image.fromarray(gray).convert(mode)
    buf = BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue(), rows, cols


@PROPERTY
@given(dicom_files())
def test_valid_dicom_decodes_to_its_shape(case: tuple[bytes, int, int]) -> None:
    data, rows, cols = case
    result = decode_image(data, limits=LIMITS)
    assert result.kind == "dicom"
    assert (result.height, result.width) == (rows, cols)
    assert_valid(result)


@PROPERTY
@given(pillow_files())
def test_valid_pillow_images_decode_to_their_shape(case: tuple[bytes, int, int]) -> None:
    data, rows, cols = case
    result = decode_image(data, limits=LIMITS)
    assert (result.height, result.width) == (rows, cols)
    assert_valid(result)


@settings(PROPERTY, max_examples=60)
@given(dicom_files() | pillow_files(), st.integers(1, 200_000), st.integers(1, 80))
def test_limits_refuse_before_decoding(
    case: tuple[bytes, int, int], max_pixels: int, min_side: int
) -> None:
    data, rows, cols = case
    limits = DecodeLimits(max_bytes=2**20, max_pixels=max_pixels, min_side=min_side)
    try:
        result = decode_image(data, limits=limits)
    except PayloadTooLargeError:
        assert rows * cols > max_pixels
    except UnprocessableImageError:
        assert min(rows, cols) < min_side
    else:
        assert_valid(result, limits)


# -- anything else: a valid image or a declared error --------------------------------------------

_MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"II*\x00",
    b"MM\x00*",
    b"BM" + bytes(12) + (40).to_bytes(4, "little"),
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
    bytes(128) + b"DICM",
    b"\x08\x00\x05\x00CS",  # a bare dataset's first element (group 0008)
    b"\x02\x00\x00\x00UL\x04\x00",  # file meta group length, no preamble
]


@PROPERTY
@given(st.sampled_from(_MAGIC), st.binary(max_size=600))
@example(b"", b"")
@example(bytes(128) + b"DICM", b"")
def test_arbitrary_bytes_decode_or_raise_a_declared_error(magic: bytes, rest: bytes) -> None:
    decode_or_declared(magic + rest)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid file, truncated and / or with bytes overwritten (headers most often)."""
    data = bytearray(draw(dicom_files() | pillow_files())[0])
    for _ in range(draw(st.integers(0, 6))):
        # Half the edits land in the first 400 bytes, where the headers are.
        end = min(len(data), 400) if draw(st.booleans()) else len(data)
        data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(1, len(data))) :]
    return bytes(data)


@settings(PROPERTY, max_examples=300)
@given(mutated_files())
def test_mutated_files_decode_or_raise_a_declared_error(data: bytes) -> None:
    decode_or_declared(data)


#: Header elements a broken modality or a hand-edited file gets wrong, with odd values.
_ODD_ELEMENTS: dict[str, st.SearchStrategy[object]] = {
    "WindowCenter": st.sampled_from([0.0, -1.0, 1e38, 40.0, 2**16]),
    "WindowWidth": st.sampled_from([0.0, -5.0, 0.5, 1e-30, 1e38]),
    "VOILUTFunction": st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"]),
    "RescaleSlope": st.sampled_from([0.0, -1.0, 1e30, 1e-30]),
    "RescaleIntercept": st.sampled_from([0.0, -1e30, 1e30]),
    "BitsStored": st.integers(0, 20),
    "HighBit": st.integers(0, 20),
    "PixelRepresentation": st.sampled_from([0, 1]),
    "SamplesPerPixel": st.sampled_from([1, 3, 4]),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "ARGB", ""]
    ),
    "PlanarConfiguration": st.sampled_from([0, 1]),
    "NumberOfFrames": st.sampled_from(["0", "2", "-1", "1"]),
    "Rows": st.integers(0, 80),
    "Columns": st.integers(0, 80),
}


@st.composite
def odd_dicom_files(draw: st.DrawFn) -> bytes:
    """A valid monochrome DICOM whose header then gets a few odd values."""
    rows, cols, bits = draw(sides), draw(sides), draw(st.sampled_from([8, 12, 16]))
    ds = images.dicom_dataset(pixels=draw(_pixels(rows, cols, bits)), bits=bits)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    names = draw(st.lists(st.sampled_from(sorted(_ODD_ELEMENTS)), min_size=1, max_size=4))
    for name in names:
        setattr(ds, name, draw(_ODD_ELEMENTS[name]))
    return images.write_dicom(ds)


@PROPERTY
@given(odd_dicom_files())
def test_dicom_with_odd_header_values_decodes_or_raises_a_declared_error(data: bytes) -> None:
    decode_or_declared(data)
