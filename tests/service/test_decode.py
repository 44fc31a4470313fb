"""Decoding uploads: accepted kinds, notes, limits checked before decoding, bad input."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.data import pil_to_array
from service import decode as decode_module
from service.decode import DecodedImage, DecodeLimits, decode_image, sniff_kind
from service.errors import (
    PayloadTooLargeError,
    UnprocessableImageError,
    UnsupportedMediaTypeError,
)
from tests.service import images

PHI = (images.PATIENT_NAME, images.PATIENT_ID, images.PATIENT_BIRTH_DATE, "Doe")


def _assert_gray(result: DecodedImage, height: int, width: int) -> None:
    assert result.pixels.shape == (height, width)
    assert (result.width, result.height) == (width, height)
    assert result.pixels.dtype == np.float32
    assert result.pixels.flags.c_contiguous
    assert 0.0 <= float(result.pixels.min()) <= float(result.pixels.max()) <= 1.0
    assert float(result.pixels.std()) > 0.01  # not blank


def _testdata(name: str) -> bytes:
    try:
        return images.testdata_dicom_bytes(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------------------------
# Sniffing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (images.png_bytes(), "png"),
        (images.jpeg_bytes(), "jpeg"),
        (images.image_bytes("TIFF"), "tiff"),
        (images.image_bytes("BMP"), "bmp"),
        (images.image_bytes("GIF"), "gif"),
        (images.image_bytes("WEBP"), "webp"),
        (images.dicom_bytes(), "dicom"),
        (images.dicom_bytes(preamble=False), "dicom"),
        (images.no_pixel_dicom_bytes(), "dicom"),
        (images.non_image_bytes("text"), None),
        (images.non_image_bytes("pdf"), None),
        (images.non_image_bytes("binary"), None),
        (b"\x08\x00" + b"\x00" * 40, None),  # looks like group 0008, is not a dataset
        (b"BMI report: normal weight, no findings.", None),  # "BM" but no BMP header
        (b"", None),
    ],
    ids=lambda v: v if isinstance(v, str) or v is None else None,
)
def test_sniff_kind(data: bytes, kind: str | None) -> None:
    assert sniff_kind(data) == kind


# ---------------------------------------------------------------------------------------------
# Accepted images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind", "note"),
    [
        (images.png_bytes(), "png", None),
        (images.png_bytes(mode="RGB"), "png", "RGB converted to gray"),
        (images.png_bytes(mode="LA"), "png", "alpha channel dropped"),
        (images.rgba_png_bytes(), "png", "composited on black"),
        (images.rgba_png_bytes(alpha=255), "png", "alpha channel dropped"),
        (images.palette_png_bytes(), "png", "palette image converted to gray"),
        (images.png_bytes(mode="1"), "png", None),
        (images.png16_bytes(bits=12), "png", "16-bit image scaled"),
        (images.png16_bytes(bits=16), "png", "16-bit image scaled"),
        (images.jpeg_bytes(), "jpeg", None),
        (images.jpeg_bytes(mode="RGB"), "jpeg", "RGB converted to gray"),
        (images.image_bytes("TIFF"), "tiff", None),
        (images.image_bytes("BMP", mode="RGB"), "bmp", "RGB converted to gray"),
        (images.image_bytes("GIF"), "gif", "palette image converted to gray"),
        (images.image_bytes("WEBP", mode="RGB"), "webp", "RGB converted to gray"),
    ],
    ids=lambda v: None if isinstance(v, bytes) else str(v),
)
def test_pillow_formats_are_accepted(data: bytes, kind: str, note: str | None) -> None:
    result = decode_image(data)
    assert result.kind == kind
    assert result.dicom is None
    _assert_gray(result, 48, 64)
    if note is not None:
        assert any(note in n for n in result.notes), result.notes


@pytest.mark.parametrize(
    "data",
    [
        images.png_bytes(),
        images.png_bytes(mode="RGB"),
        images.palette_png_bytes(),
        images.png16_bytes(bits=12),
        images.png16_bytes(bits=16),
        images.png16_bytes(bits=8),
        images.jpeg_bytes(exif_orientation=6),
    ],
)
def test_fast_paths_match_the_reference_pil_to_array(data: bytes) -> None:
    with Image.open(BytesIO(data)) as image:
        expected = pil_to_array(image)
    np.testing.assert_allclose(decode_image(data).pixels, expected, atol=1e-6)


def test_rgba_is_composited_on_black() -> None:
    # alpha ramps 0 -> 255 left to right: the left column is transparent, hence black
    result = decode_image(images.rgba_png_bytes())
    assert float(result.pixels[:, 0].max()) == 0.0
    assert float(result.pixels[:, -1].mean()) > 0.2


def test_exif_orientation_is_applied() -> None:
    result = decode_image(images.jpeg_bytes(width=64, height=48, exif_orientation=6))
    assert (result.height, result.width) == (64, 48)  # rotated 90 degrees
    assert "EXIF orientation applied" in result.notes


def test_very_large_image_within_limits() -> None:
    result = decode_image(images.large_png_bytes(4000, 3000))
    assert result.pixels.shape == (3000, 4000)
    assert result.pixels[0, 0] < result.pixels[-1, 0]  # Pillow's gradient runs top to bottom


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "note"),
    [
        ({"modality": "DX"}, "min-max scaled"),
        ({"modality": "CR", "window": (2048, 2048)}, None),
        ({"modality": "DX", "photometric": "MONOCHROME1"}, "MONOCHROME1 inverted"),
        ({"modality": "OT", "photometric": "RGB"}, "RGB converted to gray"),
        ({"modality": "DX", "frames": 3}, "multi-frame DICOM: used frame 1 of 3"),
        ({"modality": "DX", "bits": 16, "rescale": (2.0, -1024.0)}, None),
        ({"compression": "rle"}, None),
        ({"compression": "jpeg2000"}, None),
        ({"compression": "jpegls"}, None),
        ({"compression": "jpeg", "bits": 8}, None),
        ({"compression": "jpeg", "photometric": "RGB", "modality": "OT"}, "converted to gray"),
        ({"compression": "rle", "frames": 2}, "used frame 1 of 2"),
        ({"preamble": False}, "no transfer syntax in its file meta"),
    ],
    ids=lambda v: None if isinstance(v, dict) else str(v),
)
def test_dicom_variants_are_accepted(kwargs: dict[str, object], note: str | None) -> None:
    ds = images.dicom_dataset(
        **{k: v for k, v in kwargs.items() if k != "preamble"}  # type: ignore[arg-type]
    )
    data = images.write_dicom(ds, preamble=bool(kwargs.get("preamble", True)))
    result = decode_image(data, content_type="application/dicom", filename="image.dcm")
    assert result.kind == "dicom"
    _assert_gray(result, 64, 64)
    assert result.dicom is not None
    assert result.dicom.sop_instance_uid == ds.SOPInstanceUID
    assert result.dicom.study_uid == ds.StudyInstanceUID
    assert result.dicom.series_uid == ds.SeriesInstanceUID
    assert result.dicom.modality == ds.Modality
    assert result.dicom.frames == int(kwargs.get("frames", 1))  # type: ignore[call-overload]
    assert result.dicom.transfer_syntax == str(ds.file_meta.TransferSyntaxUID)
    if note is not None:
        assert any(note in n for n in result.notes), result.notes
    assert not any("content type" in n for n in result.notes)
    text = repr(result.dicom) + " ".join(result.notes)
    assert not any(phi in text for phi in PHI)


def test_dx_info_has_view_position_and_sop_class() -> None:
    result = decode_image(images.dicom_bytes(modality="DX"))
    assert result.dicom is not None
    assert result.dicom.view_position == "PA"
    assert result.dicom.sop_class_uid == str(images.DX_STORAGE)
    assert result.dicom.photometric == "MONOCHROME2"


def test_monochrome1_is_inverted() -> None:
    pixels = images.gray_array(64, 64, bits=12)
    mono2 = decode_image(images.write_dicom(images.dicom_dataset(pixels, bits=12)))
    mono1 = decode_image(
        images.write_dicom(images.dicom_dataset(pixels, bits=12, photometric="MONOCHROME1"))
    )
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)


def test_multi_frame_uses_the_first_frame() -> None:
    frames = np.stack([images.gray_array(64, 64, bits=12, seed=s) for s in (1, 2, 3)])
    multi = decode_image(images.write_dicom(images.dicom_dataset(frames, bits=12)))
    first = decode_image(images.write_dicom(images.dicom_dataset(frames[0], bits=12)))
    np.testing.assert_array_equal(multi.pixels, first.pixels)


@pytest.mark.parametrize("compression", ["rle", "jpeg2000", "jpegls"])
def test_lossless_compression_decodes_like_uncompressed(compression: str) -> None:
    pixels = images.gray_array(64, 64, bits=12)
    plain = decode_image(images.write_dicom(images.dicom_dataset(pixels, bits=12)))
    packed = decode_image(
        images.write_dicom(images.dicom_dataset(pixels, bits=12, compression=compression))
    )
    np.testing.assert_array_equal(packed.pixels, plain.pixels)


@pytest.mark.parametrize(
    ("name", "shape", "note"),
    [
        ("JPEG2000.dcm", (1024, 256), None),
        ("MR_small_RLE.dcm", (64, 64), None),
        ("CT_small.dcm", (128, 128), None),
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100), "YBR_FULL converted to gray"),
        ("SC_rgb_rle_2frame.dcm", (100, 100), "used frame 1 of 2"),
        ("examples_palette.dcm", (800, 350)[::-1], "PALETTE COLOR converted to gray"),
        ("image_dfl.dcm", (512, 512), None),
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64), None),
    ],
)
def test_pydicom_test_files(name: str, shape: tuple[int, int], note: str | None) -> None:
    result = decode_image(_testdata(name))
    assert result.pixels.shape == shape
    assert result.kind == "dicom"
    if note is not None:
        assert any(note in n for n in result.notes), result.notes


# ---------------------------------------------------------------------------------------------
# Declared type
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "filename", "noted"),
    [
        ("image/png", "x.png", False),
        ("image/png; charset=binary", None, False),
        ("application/octet-stream", None, False),
        (None, None, False),
        ("image/jpeg", None, True),
        ("application/dicom", None, True),
        (None, "scan.jpg", True),
        (None, "scan.bin", False),
    ],
)
def test_a_contradicting_content_type_is_noted_not_fatal(
    content_type: str | None, filename: str | None, noted: bool
) -> None:
    result = decode_image(images.png_bytes(), content_type=content_type, filename=filename)
    assert result.kind == "png"
    mismatch = [n for n in result.notes if "does not match" in n]
    assert bool(mismatch) == noted, result.notes


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_empty_file() -> None:
    with pytest.raises(UnprocessableImageError, match="empty file"):
        decode_image(b"")


def test_upload_over_max_bytes_names_the_limit() -> None:
    data = images.png_bytes()
    with pytest.raises(PayloadTooLargeError, match=r"limit is 100 bytes") as info:
        decode_image(data, limits=DecodeLimits(max_bytes=100))
    assert info.value.status == 413


@pytest.mark.parametrize("kind", ["text", "pdf", "zip", "json", "html", "binary"])
def test_not_an_image_is_415_naming_what_came(kind: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        decode_image(images.non_image_bytes(kind), content_type="image/png")
    message = info.value.message
    assert info.value.status == 415
    assert "image/png" in message
    assert "PNG, JPEG or DICOM" in message
    assert "Clinical indication" not in message  # never echoes the content


@pytest.mark.parametrize(
    "data",
    [images.bomb_png(), images.bomb_png(20_000, 20_000), images.bomb_jpeg(), images.bomb_dicom()],
    ids=["png-1e10", "png-4e8", "jpeg-4e9", "dicom-4e9"],
)
def test_decompression_bombs_are_refused_from_the_header(data: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match="limit") as info:
        decode_image(data)
    assert info.value.status == 413
    assert time.perf_counter() - start < 5.0  # from the header: no pixel is decoded


@pytest.mark.parametrize(
    "data", [images.png_bytes(width=64, height=48), images.dicom_bytes(rows=64, columns=48)]
)
def test_pixel_limit_is_per_image_and_configurable(data: bytes) -> None:
    with pytest.raises(PayloadTooLargeError, match="3072 pixels; the limit is 3000"):
        decode_image(data, limits=DecodeLimits(max_pixels=3000))
    decode_image(data, limits=DecodeLimits(max_pixels=3072))


def test_pixel_limit_is_checked_before_the_pixels_are_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels decoded before the size check")

    inputs = (images.png_bytes(), images.jpeg_bytes(), images.dicom_bytes())
    monkeypatch.setattr(decode_module, "dicom_to_array", no_decoding)
    monkeypatch.setattr(decode_module, "_pil_gray", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    limits = DecodeLimits(max_pixels=100)
    for data in inputs:
        with pytest.raises(PayloadTooLargeError):
            decode_image(data, limits=limits)


@pytest.mark.parametrize(
    "data",
    [
        images.png_bytes(width=8, height=64),
        images.jpeg_bytes(width=64, height=15),
        images.dicom_bytes(rows=10, columns=64),
    ],
)
def test_too_small(data: bytes) -> None:
    with pytest.raises(UnprocessableImageError, match="image too small") as info:
        decode_image(data)
    assert info.value.status == 422


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("PNG", images.png_bytes(width=128, height=128)),
        ("JPEG", images.jpeg_bytes(width=128, height=128)),
        ("DICOM", images.dicom_bytes(rows=128, columns=128)),
        ("DICOM", images.dicom_bytes(rows=128, columns=128, compression="rle")),
        ("DICOM", images.dicom_bytes(rows=128, columns=128, compression="jpeg2000")),
    ],
    ids=["png", "jpeg", "dicom", "dicom-rle", "dicom-j2k"],
)
def test_truncated_files_are_422(label: str, data: bytes, keep: float) -> None:
    with pytest.raises(UnprocessableImageError) as info:
        decode_image(images.truncated(data, keep))
    message = info.value.message
    assert label in message and "truncated" in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize("keep", [140, 300, 500, 900])
def test_dicom_truncated_in_the_header_is_422(keep: int) -> None:
    with pytest.raises(UnprocessableImageError, match="truncated"):
        decode_image(images.dicom_bytes()[:keep])


def test_corrupt_png() -> None:
    with pytest.raises(UnprocessableImageError, match="truncated or corrupt PNG"):
        decode_image(images.corrupt_png())


def test_dicom_without_pixel_data_names_the_sop_class() -> None:
    with pytest.raises(UnprocessableImageError, match=r"no pixel data \(SOP class Basic Text SR"):
        decode_image(images.no_pixel_dicom_bytes())


@pytest.mark.parametrize("how", ["rows", "frames", "columns_smaller", "bits"])
def test_inconsistent_dicom_sizes(how: str) -> None:
    with pytest.raises(UnprocessableImageError, match="inconsistent DICOM") as info:
        decode_image(images.inconsistent_dicom_bytes(how))
    assert info.value.status == 422


def test_unsupported_transfer_syntax_is_named() -> None:
    with pytest.raises(UnprocessableImageError, match=r"MPEG2 .*1\.2\.840\.10008\.1\.2\.4\.100"):
        decode_image(images.unsupported_syntax_dicom_bytes())


def test_missing_codec_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable:
        is_available = False
        missing_dependencies = ("pylibjpeg-openjpeg",)

    monkeypatch.setattr(decode_module, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(UnprocessableImageError, match=r"no codec .*JPEG 2000.*pylibjpeg-openjpeg"):
        decode_image(images.dicom_bytes(compression="jpeg2000"))


def test_unexpected_decoder_failure_is_422_without_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"internal state dump: {images.PATIENT_NAME}")

    monkeypatch.setattr(decode_module, "dicom_to_array", boom)
    with pytest.raises(UnprocessableImageError) as info:
        decode_image(images.dicom_bytes())
    assert info.value.message == "cannot decode the DICOM image (RuntimeError)"


@pytest.mark.parametrize(
    "data",
    [
        images.no_pixel_dicom_bytes(),
        images.inconsistent_dicom_bytes("rows"),
        images.truncated(images.dicom_bytes(), 0.4),
        images.bomb_dicom(),
        images.dicom_bytes(rows=8, columns=8),
    ],
)
def test_errors_never_carry_patient_data(data: bytes) -> None:
    with pytest.raises((UnprocessableImageError, PayloadTooLargeError)) as info:
        decode_image(data)
    assert not any(phi in info.value.message for phi in PHI)


@pytest.mark.parametrize(
    "field", [{"max_bytes": 0}, {"max_pixels": -1}, {"min_side": 0}, {"min_side": 1.5}]
)
def test_limits_are_validated(field: dict[str, object]) -> None:
    name = next(iter(field))
    with pytest.raises(ValueError, match=name):
        DecodeLimits(**field)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------


def test_decoding_is_thread_safe() -> None:
    inputs = [
        images.png_bytes(seed=1),
        images.jpeg_bytes(seed=2),
        images.png16_bytes(seed=3),
        images.rgba_png_bytes(seed=4),
        images.dicom_bytes(seed=5),
        images.dicom_bytes(seed=6, compression="rle"),
        images.dicom_bytes(seed=7, compression="jpeg2000"),
        images.dicom_bytes(seed=8, photometric="MONOCHROME1", frames=2),
    ] * 4
    expected = [decode_image(d).pixels for d in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(decode_image, inputs))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got.pixels, want)
