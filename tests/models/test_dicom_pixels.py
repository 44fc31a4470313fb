"""DICOM pixel decoding: modality LUT, window / VOI LUT, MONOCHROME1, colour, frames."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.dicom_pixels import dicom_to_array
from models.errors import DataError


def _dx(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    **attrs: object,
) -> Dataset:
    """An in-memory DX-like dataset built with pydicom (no file)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


RAMP = np.linspace(0, 4095, 64).astype(np.uint16).reshape(8, 8)


def test_window_maps_to_unit_range() -> None:
    ds = _dx(RAMP, WindowCenter=2048, WindowWidth=1024)
    out = dicom_to_array(ds)
    assert out.dtype == np.float32 and out.shape == (8, 8)
    # PS3.3 C.11.2.1.2.1 LINEAR: below c - 0.5 - (w - 1) / 2 -> 0, above -> 1
    lo, hi = 2047.5 - 511.5, 2047.5 + 511.5
    values = RAMP.astype(float)
    expected = np.clip((values - 2047.5) / 1023 + 0.5, 0, 1)
    expected[values <= lo] = 0
    expected[values > hi] = 1
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_rescale_then_window_in_modality_units() -> None:
    # stored s -> HU = 2 s - 1024; window centre 40 HU, width 400 HU
    ds = _dx(RAMP, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    out = dicom_to_array(ds)
    hu = RAMP * 2.0 - 1024
    assert np.all(out[hu <= 40 - 200] == 0) and np.all(out[hu > 40 + 200] == 1)
    inside = (hu > -160) & (hu < 240)
    assert inside.any() and np.all((out[inside] > 0) & (out[inside] < 1))


def test_without_voi_min_max() -> None:
    pixels = np.array([[100, 300], [200, 500]], np.uint16)
    np.testing.assert_allclose(dicom_to_array(_dx(pixels)), [[0, 0.5], [0.25, 1]], atol=1e-6)


def test_voi_lut_sequence() -> None:
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUTDescriptor: 4096 entries, 8-bit output
    lut.add_new(0x00283006, "US", (np.arange(4096) // 16).tolist())  # LUTData
    ds = _dx(RAMP)
    ds.VOILUTSequence = [lut]
    np.testing.assert_allclose(dicom_to_array(ds), (RAMP // 16) / 255.0, atol=1e-6)
    # a rescale makes the modality output float; the LUT still indexes by value
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    np.testing.assert_allclose(dicom_to_array(ds), (RAMP // 16) / 255.0, atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    m2 = dicom_to_array(_dx(RAMP, "MONOCHROME2", WindowCenter=2048, WindowWidth=4096))
    m1 = dicom_to_array(_dx(RAMP, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096))
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)
    assert m1[0, 0] == pytest.approx(1.0) and m1[-1, -1] == pytest.approx(0.0)


def test_invalid_window_falls_back_to_min_max() -> None:
    out = dicom_to_array(_dx(RAMP, WindowCenter=100, WindowWidth=0))
    assert out.min() == 0 and out.max() == 1


def test_rgb_becomes_luminance() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (255, 255, 255)
    out = dicom_to_array(_dx(rgb, "RGB", 8))
    np.testing.assert_allclose(out, [[0.299, 0.587], [0.114, 1.0]], atol=1e-6)


def test_multi_frame_first_frame_by_default() -> None:
    frames = np.stack([np.full((4, 4), v, np.uint16) for v in (0, 1000, 4000)])
    frames[:, 0, 0] = 4095  # each frame spans a range so min-max is defined
    ds = _dx(frames)
    assert int(ds.NumberOfFrames) == 3
    first = dicom_to_array(ds)
    assert first.shape == (4, 4) and first[1, 1] == 0.0
    third = dicom_to_array(ds, frame=2)
    assert third[1, 1] == pytest.approx(0.0) and third[0, 0] == 1.0
    assert dicom_to_array(ds, frame=1)[1, 1] == pytest.approx(0.0)
    with pytest.raises(DataError, match="frame must be in \\[0, 2\\]"):
        dicom_to_array(ds, frame=3)


def test_no_pixel_data() -> None:
    ds = Dataset()
    ds.PatientID = "x"
    with pytest.raises(DataError, match="no pixel data"):
        dicom_to_array(ds)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("CT_small.dcm", (128, 128)),  # rescale
        ("MR_small.dcm", (64, 64)),  # window
        ("MR_small_RLE.dcm", (64, 64)),  # RLE
        ("JPEG2000.dcm", (1024, 256)),  # JPEG 2000 (pylibjpeg-openjpeg)
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100)),  # YBR_FULL JPEG baseline
        ("examples_palette.dcm", (350, 800)),  # PALETTE COLOR
        ("SC_rgb_rle_16bit_2frame.dcm", (100, 100)),  # 16-bit RGB, 2 frames
    ],
)
def test_pydicom_test_files(name: str, shape: tuple[int, int]) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not bundled with this pydicom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        out = dicom_to_array(ds)
    assert out.shape == shape and out.dtype == np.float32
    assert 0.0 <= out.min() < out.max() <= 1.0


def test_mr_small_matches_its_own_window() -> None:
    path = get_testdata_file("MR_small.dcm", download=False)
    if path is None:
        pytest.skip("MR_small.dcm not bundled")
    ds = pydicom.dcmread(path)
    out = dicom_to_array(ds)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(float)
    assert np.all(out[raw <= c - 0.5 - (w - 1) / 2] == 0)
    assert np.all(out[raw > c - 0.5 + (w - 1) / 2] == 1)
