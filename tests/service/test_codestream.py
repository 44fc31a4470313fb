"""Frame sizes read from JPEG, JPEG-LS and JPEG 2000 headers, checked against pydicom's files."""

from __future__ import annotations

import io

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_fragmented_frames

from service.codestream import frame_size


@pytest.mark.parametrize("fmt", ["JPEG", "JPEG2000"])
def test_size_of_an_encoded_image(fmt: str) -> None:
    out = io.BytesIO()
    Image.new("L", (300, 200), 90).save(out, fmt)
    assert frame_size(out.getvalue()) == (300, 200)


@pytest.mark.parametrize(
    "name",
    ["JPEG2000.dcm", "JPEG-lossy.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
)
def test_size_matches_the_dicom_header(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    first = next(generate_fragmented_frames(ds.PixelData, number_of_frames=1))[0]
    assert frame_size(first) == (ds.Columns, ds.Rows)


@pytest.mark.parametrize(
    "data", [b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"RLE data", b"\xff\x4f\xff\x51\x00"]
)
def test_unreadable_headers_give_none(data: bytes) -> None:
    assert frame_size(data) is None
