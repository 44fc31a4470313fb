"""Test inputs built on the fly: images, DICOM objects and broken files as bytes.

Every helper is deterministic (fixed seeds) and fast (small images unless asked). Shared
by the service tests: decoding, the predict route, STOW-RS, storage.

- PIL formats: :func:`png_bytes`, :func:`jpeg_bytes`, :func:`png16_bytes`,
  :func:`rgba_png_bytes`, :func:`palette_png_bytes`, :func:`image_bytes` (TIFF, BMP, GIF,
  WebP);
- DICOM: :func:`dicom_dataset` / :func:`dicom_bytes` (DX / CR, MONOCHROME1/2, RGB,
  multi-frame, 8-16 bits, window, rescale, RLE / JPEG 2000 / JPEG baseline / JPEG-LS, with
  or without preamble), :func:`no_pixel_dicom_bytes`, :func:`inconsistent_dicom_bytes`,
  :func:`testdata_dicom_bytes` (pydicom's bundled test files);
- broken input: :func:`truncated`, :func:`bomb_png`, :func:`bomb_jpeg`,
  :func:`corrupt_png`, :func:`non_image_bytes`.

A planted patient name (:data:`PATIENT_NAME`) and id are in every generated DICOM, so tests
can check that they never reach a response or a log.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

#: Planted in every generated DICOM; must never appear in a response body or a log.
PATIENT_NAME = "Doe^Jane^Planted"
PATIENT_ID = "PID-PLANTED-4711"
PATIENT_BIRTH_DATE = "19450317"
ACCESSION_NUMBER = "ACC-PLANTED-99"

DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR Storage
#: Transfer syntaxes :func:`dicom_bytes` can write (name -> UID).
COMPRESSIONS: dict[str, UID] = {
    "none": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg": JPEGBaseline8Bit,
    "jpegls": JPEGLSLossless,
}


# ---------------------------------------------------------------------------------------------
# Pixel arrays
# ---------------------------------------------------------------------------------------------


def gray_array(
    height: int = 48, width: int = 64, *, bits: int = 8, seed: int = 0, blob: bool = True
) -> np.ndarray:
    """A deterministic ``(height, width)`` unsigned image using ``bits`` bits: a
    left-to-right ramp plus noise, with a bright disc in the upper-left quadrant (so
    orientation, inversion and cropping are visible). uint8 for bits <= 8, else uint16."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    ramp = np.linspace(0.1, 0.6, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    img = ramp + rng.normal(0.0, 0.03, size=(height, width))
    if blob:
        yy, xx = np.mgrid[:height, :width]
        cy, cx, r = height * 0.3, width * 0.3, max(2.0, min(height, width) * 0.15)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0.95
    img = np.clip(img, 0.0, 1.0) * top
    return np.rint(img).astype(np.uint8 if bits <= 8 else np.uint16)


def rgb_array(height: int = 48, width: int = 64, *, seed: int = 0) -> np.ndarray:
    """``(height, width, 3)`` uint8 colour image: the gray image with tinted channels."""
    g = gray_array(height, width, seed=seed).astype(np.int16)
    return np.clip(np.stack([g, g * 0.8 + 20, g * 0.6 + 40], axis=-1), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Pillow formats
# ---------------------------------------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_bytes(
    array: np.ndarray | None = None,
    *,
    width: int = 64,
    height: int = 48,
    mode: str = "L",
    seed: int = 0,
) -> bytes:
    """A PNG of ``array`` (uint8 ``(H, W)`` or ``(H, W, 3|4)``), or of a generated image
    in ``mode`` (``"L"``, ``"RGB"``, ``"RGBA"``, ``"LA"``, ``"P"``, ``"1"``)."""
    if array is not None:
        return image_bytes(array, "PNG")
    return image_bytes("PNG", width=width, height=height, mode=mode, seed=seed)


def image_bytes(
    source: str | np.ndarray,
    fmt: str | None = None,
    *,
    width: int = 64,
    height: int = 48,
    mode: str = "L",
    seed: int = 0,
) -> bytes:
    """An image saved by Pillow as ``fmt`` (``"PNG"``, ``"JPEG"``, ``"TIFF"``, ``"BMP"``,
    ``"GIF"``, ``"WEBP"``).

    ``image_bytes("TIFF", mode="RGB")`` saves a generated image in ``mode``;
    ``image_bytes(array, "PNG")`` saves a uint8 ``(H, W)`` / ``(H, W, 3|4)`` array.
    """
    if isinstance(source, np.ndarray):
        image = Image.fromarray(source)
        fmt = (fmt or "PNG").upper()
    else:
        if fmt is not None:
            raise TypeError("give the format once: image_bytes(fmt) or image_bytes(array, fmt)")
        fmt = source.upper()
        if mode in ("RGB", "RGBA"):
            image = Image.fromarray(rgb_array(height, width, seed=seed))
            if mode == "RGBA":
                image.putalpha(255)
        else:
            image = Image.fromarray(gray_array(height, width, seed=seed))
            if mode == "LA":
                image.putalpha(255)
            elif mode != "L":
                image = image.convert(mode)
    params: dict[str, object] = {}
    if fmt == "JPEG":
        params = {"quality": 92}
    elif fmt == "WEBP":
        params = {"lossless": True}
    return _save(image, fmt, **params)


def jpeg_bytes(
    *, width: int = 64, height: int = 48, mode: str = "L", seed: int = 0, exif_orientation: int = 1
) -> bytes:
    """A baseline JPEG (quality 92), gray (``"L"``) or ``"RGB"``; ``exif_orientation``
    2-8 writes that EXIF Orientation tag (the pixels stay as generated)."""
    if exif_orientation == 1:
        return image_bytes("JPEG", width=width, height=height, mode=mode, seed=seed)
    image = Image.fromarray(gray_array(height, width, seed=seed))
    if mode != "L":
        image = image.convert(mode)
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    return _save(image, "JPEG", quality=92, exif=exif.tobytes())


def png16_bytes(*, width: int = 64, height: int = 48, bits: int = 12, seed: int = 0) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode ``I;16``) whose values use ``bits`` bits."""
    values = gray_array(height, width, bits=max(bits, 9), seed=seed)
    if bits < 9:
        values = (values >> (9 - bits)).astype(np.uint16)
    image = Image.fromarray(values.astype(np.uint16))  # mode I;16
    return _save(image, "PNG")


def rgba_png_bytes(
    *, width: int = 64, height: int = 48, alpha: int | None = None, seed: int = 0
) -> bytes:
    """An RGBA PNG; ``alpha`` None gives a left-to-right alpha ramp (0 -> 255), an int a
    constant alpha."""
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = rgb_array(height, width, seed=seed)
    if alpha is None:
        rgba[..., 3] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    else:
        rgba[..., 3] = alpha
    return _save(Image.fromarray(rgba), "PNG")


def large_png_bytes(width: int = 4000, height: int = 3000) -> bytes:
    """A big but cheap 8-bit gray PNG (a smooth gradient: fast to encode and decode)."""
    image = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    return _save(image, "PNG", compress_level=1)


def palette_png_bytes(*, width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A palette (mode ``P``) PNG with an adaptive 64-colour palette."""
    image = Image.fromarray(rgb_array(height, width, seed=seed)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=64
    )
    return _save(image, "PNG")


# ---------------------------------------------------------------------------------------------
# Broken and hostile input
# ---------------------------------------------------------------------------------------------


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of ``data`` (at least one byte)."""
    return data[: max(1, int(len(data) * keep))]


def corrupt_png(seed: int = 0) -> bytes:
    """A PNG whose header is intact but whose compressed pixel stream is garbage."""
    data = bytearray(png_bytes(width=64, height=64, seed=seed))
    start = data.index(b"IDAT") + 4
    rng = np.random.default_rng(seed)
    data[start + 2 : start + 200] = rng.integers(0, 256, 198, dtype=np.uint8).tobytes()
    return bytes(data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` 8-bit gray pixels (10^10 by
    default): a decompression bomb must be refused from the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)  # a few rows of zeros; the rest is "missing"
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bomb_jpeg(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small valid JPEG whose SOF header is patched to claim ``width`` x ``height``."""
    data = bytearray(jpeg_bytes(width=32, height=32))
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        pos = data.find(marker)
        if pos >= 0:
            # SOF: marker, length (2), precision (1), height (2), width (2)
            data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise AssertionError("no SOF marker in the generated JPEG")


def bomb_dicom(rows: int = 65_535, columns: int = 65_535, frames: int = 1) -> bytes:
    """A small uncompressed DICOM whose header claims ``rows`` x ``columns`` (x ``frames``)
    pixels: the pixel limit must refuse it (413) before the Pixel Data is looked at."""
    ds = dicom_dataset(rows=16, columns=16, bits=8)
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    return write_dicom(ds)


def unsupported_syntax_dicom_bytes(transfer_syntax: str = "1.2.840.10008.1.2.4.100") -> bytes:
    """A DX whose encapsulated Pixel Data claims ``transfer_syntax`` (default MPEG2 Main
    Profile, which pydicom cannot decode)."""
    ds = dicom_dataset(rows=32, columns=32, bits=8)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return write_dicom(ds)


def non_image_bytes(kind: str = "text") -> bytes:
    """Bytes that are not an image: ``"text"``, ``"pdf"``, ``"zip"``, ``"json"``,
    ``"html"`` or ``"binary"`` (random)."""
    samples = {
        "text": b"Clinical indication: cough for two weeks.\n",
        "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        "zip": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40,
        "json": b'{"image": "not really"}',
        "html": b"<!DOCTYPE html><html><body>hello</body></html>",
        "binary": np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes(),
    }
    return samples[kind]


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def dicom_dataset(
    pixels: np.ndarray | None = None,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    rows: int = 64,
    columns: int = 64,
    bits: int = 12,
    frames: int = 1,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    compression: str = "none",
    seed: int = 0,
    **attrs: object,
) -> Dataset:
    """A DICOM image dataset built with pydicom, with file meta, ready to write.

    Args:
        pixels: the stored values, ``(rows, cols)``, ``(frames, rows, cols)``, or with a
            trailing 3 for RGB; None generates them from the other arguments.
        modality: ``"DX"`` (default, DX Image Storage), ``"CR"`` (CR Image Storage), or any
            other code (Secondary Capture).
        photometric: ``"MONOCHROME2"``, ``"MONOCHROME1"`` or ``"RGB"``.
        rows, columns, bits, frames: size and Bits Stored of generated pixels.
        window: ``(center, width)`` written as Window Center / Width.
        rescale: ``(slope, intercept)`` written as Rescale Slope / Intercept.
        compression: a key of :data:`COMPRESSIONS` (``"jpeg"`` needs 8-bit pixels).
        seed: for generated pixels.
        **attrs: more DICOM keywords to set (e.g. ``ViewPosition="PA"``).
    """
    if pixels is None:
        if photometric == "RGB":
            pixels = np.stack([rgb_array(rows, columns, seed=seed + i) for i in range(frames)])
            bits = 8
        else:
            pixels = np.stack(
                [gray_array(rows, columns, bits=bits, seed=seed + i) for i in range(frames)]
            )
        if frames == 1:
            pixels = pixels[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = {"DX": DX_STORAGE, "CR": CR_STORAGE}.get(modality, SC_STORAGE)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.AccessionNumber = ACCESSION_NUMBER
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.set_pixel_data(pixels, photometric, bits)  # sets SOP Instance UID too
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if modality in ("DX", "CR"):
        ds.ViewPosition = "PA"
        ds.PresentationIntentType = "FOR PRESENTATION"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for key, value in attrs.items():
        setattr(ds, key, value)
    if compression != "none":
        _compress(ds, compression)
    return ds


def _compress(ds: Dataset, compression: str) -> None:
    uid = COMPRESSIONS[compression]
    if compression != "jpeg":
        ds.compress(uid, generate_instance_uid=False)
        return
    # pydicom has no baseline JPEG encoder: encapsulate Pillow's JPEG of each frame
    arr = ds.pixel_array
    if arr.dtype != np.uint8:
        raise ValueError("JPEG baseline needs 8-bit pixels (bits=8)")
    frames = arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[None]
    fragments = [_save(Image.fromarray(frame), "JPEG", quality=95) for frame in frames]
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid
    if ds.PhotometricInterpretation == "RGB":
        ds.PhotometricInterpretation = "YBR_FULL_422"  # what Pillow's JPEG holds


def write_dicom(ds: Dataset, *, preamble: bool = True) -> bytes:
    """``ds`` as bytes: a Part 10 file, or (``preamble=False``) the bare dataset without
    preamble and file meta (as some old systems export)."""
    buf = BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        bare = Dataset()
        bare.update(ds)
        pydicom.dcmwrite(buf, bare, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def dicom_bytes(*, preamble: bool = True, **kwargs: object) -> bytes:
    """:func:`dicom_dataset` with ``kwargs``, written by :func:`write_dicom`."""
    return write_dicom(dicom_dataset(**kwargs), preamble=preamble)  # type: ignore[arg-type]


def no_pixel_dicom_bytes() -> bytes:
    """A Basic Text SR object (no Pixel Data) with the planted patient data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "SR"
    return write_dicom(ds)


def inconsistent_dicom_bytes(how: str = "rows") -> bytes:
    """An uncompressed DX whose header disagrees with its Pixel Data length.

    ``how``: ``"rows"`` (Rows doubled: data too short), ``"frames"`` (Number of Frames 3
    on one frame of data), ``"columns_smaller"`` (Columns halved: data far too long),
    ``"bits"`` (Bits Allocated 32 on 16-bit data).
    """
    ds = dicom_dataset(rows=64, columns=64, bits=12)
    if how == "rows":
        ds.Rows = 128
    elif how == "frames":
        ds.NumberOfFrames = 3
    elif how == "columns_smaller":
        ds.Columns = 32
    elif how == "bits":
        ds.BitsAllocated = 32
    else:
        raise ValueError(f"unknown inconsistency {how!r}")
    return write_dicom(ds)


def testdata_dicom_bytes(name: str) -> bytes:
    """A file bundled with pydicom (``pydicom.data``), never downloaded.

    Raises:
        FileNotFoundError: the file is not bundled with this pydicom (tests should skip).
    """
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not bundled with pydicom {pydicom.__version__}")
    with open(str(path), "rb") as f:
        return f.read()
