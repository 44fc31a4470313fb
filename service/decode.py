"""Uploaded bytes -> a grayscale image in [0, 1]: the ``decode`` stage of the pipeline.

What a client sends is identified by its bytes, never by its content type or file name
(PACS and browsers often get those wrong; a contradiction becomes a note): DICOM Part 10
(``DICM`` at byte 128, or a dataset without preamble that pydicom parses cleanly), PNG,
JPEG, and TIFF / BMP / GIF / WebP through Pillow.

Every check that can refuse an upload runs before the pixels are decoded: the byte size,
then the pixel count and the smallest side read from the header (Pillow's lazy
``Image.open``; the DICOM Rows / Columns / Number of Frames, with the Pixel Data element
deferred), then, for uncompressed DICOM, the Pixel Data length against what the header
describes. DICOM pixels go through :func:`models.dicom_pixels.dicom_to_array` (modality
LUT, VOI LUT or window, MONOCHROME1 inversion, colour to luminance, first frame).

Errors are :mod:`service.errors` classes with short messages that name the problem and
never carry patient data or a traceback. :func:`decode_image` keeps no shared mutable
state (the one Pillow global it touches is raised under a lock), so it is safe to call
from a thread pool.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import PurePath
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from models.data import pil_to_array
from models.dicom_pixels import dicom_to_array
from models.errors import DataError
from service.codestream import frame_size
from service.deflate import DeflateBombError, check_inflated_size
from service.errors import (
    PayloadTooLargeError,
    ServiceError,
    UnprocessableImageError,
    UnsupportedMediaTypeError,
)

log = logging.getLogger(__name__)

#: Kinds :func:`sniff_kind` returns and their usual content types.
CONTENT_TYPES: dict[str, tuple[str, ...]] = {
    "dicom": ("application/dicom", "application/x-dicom", "image/dicom", "image/x-dicom"),
    "png": ("image/png", "image/x-png", "image/apng"),
    "jpeg": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "tiff": ("image/tiff", "image/x-tiff"),
    "bmp": ("image/bmp", "image/x-bmp", "image/x-ms-bmp"),
    "gif": ("image/gif",),
    "webp": ("image/webp",),
}
#: File name extensions of each kind (a mismatch is only noted).
_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "dicom": (".dcm", ".dicom", ".dic"),
    "png": (".png",),
    "jpeg": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "tiff": (".tif", ".tiff"),
    "bmp": (".bmp",),
    "gif": (".gif",),
    "webp": (".webp",),
}
#: Content types that say nothing about the format.
_GENERIC_TYPES = frozenset(
    {"", "application/octet-stream", "binary/octet-stream", "application/unknown"}
)
ACCEPTED = "PNG, JPEG or DICOM (also TIFF, BMP, GIF, WebP)"
_PIL_FORMATS = {
    "png": "PNG",
    "jpeg": "JPEG",
    "tiff": "TIFF",
    "bmp": "BMP",
    "gif": "GIF",
    "webp": "WEBP",
}
# Sizes of the BMP info headers (BITMAPCOREHEADER ... BITMAPV5HEADER) after "BM".
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements longer than this stay on the buffer until the pixels are decoded, so a refused
# upload never copies its Pixel Data.
_DEFER_SIZE = 64 * 1024
# Modalities that are certainly not projection radiographs (only noted; the model decides).
_NOT_RADIOGRAPH = frozenset({"CT", "MR", "US", "NM", "PT", "XA", "RF", "MG", "SEG", "RTDOSE"})
# Pillow's own decompression-bomb guard is a process global; it is only ever raised (under
# this lock) to the largest limit in use, and each call enforces its own limit itself.
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may cost before any pixel is decoded.

    Args:
        max_bytes: largest upload in bytes (default 50 MiB); larger -> 413.
        max_pixels: largest width x height of one frame (default 60 million, a 7746-pixel
            square), read from the header before decoding; larger -> 413.
        min_side: smallest width or height in pixels (default 16); smaller -> 422.
    """

    max_bytes: int = 50 * 2**20  # upload size -> 413
    max_pixels: int = 60_000_000  # width * height per frame -> 413, checked from the header
    min_side: int = 16  # smaller -> 422 "image too small"

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class DicomInfo:
    """Identifiers and technical tags of a decoded DICOM object (never patient data)."""

    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    view_position: str | None
    photometric: str | None
    frames: int
    transfer_syntax: str | None


@dataclass
class DecodedImage:
    """A decoded upload.

    Attributes:
        pixels: ``(height, width)`` float32 in [0, 1], C-contiguous; bright means dense.
        kind: ``"dicom"``, ``"png"``, ``"jpeg"``, ``"tiff"``, ``"bmp"``, ``"gif"``, ``"webp"``.
        width, height: size of ``pixels``.
        notes: what was done that a reader should know (frame chosen, inversion, colour to
            gray, scaling, a content type that did not match the bytes).
        dicom: identifiers and technical tags when ``kind == "dicom"``.
    """

    pixels: np.ndarray
    kind: str
    width: int
    height: int
    notes: list[str] = field(default_factory=list)
    dicom: DicomInfo | None = None


# ---------------------------------------------------------------------------------------------
# Sniffing
# ---------------------------------------------------------------------------------------------


def sniff_kind(data: bytes) -> str | None:
    """The image kind of ``data`` from its magic bytes, or None when it is not one we read.

    DICOM is recognised by ``DICM`` at byte 128 (checked first: a Part 10 preamble may hold
    anything, even a TIFF header) or, without a preamble, by a first element in group 0002
    or 0008 and a dataset pydicom then parses without error that has a SOP Class UID or
    Rows / Columns.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if data.startswith(b"BM") and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if _headerless_dicom(data):
        return "dicom"
    return None


def _headerless_dicom(data: bytes) -> bool:
    """A DICOM dataset written without preamble and file meta (old or raw exports)."""
    if len(data) < 16:
        return False
    if int.from_bytes(data[:2], "little") not in (0x0002, 0x0008) and int.from_bytes(
        data[:2], "big"
    ) not in (0x0002, 0x0008):
        return False
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True, stop_before_pixels=True)
        return "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:  # any parse failure means "not DICOM"
        return False


def _describe_unknown(data: bytes) -> str:
    """What the bytes look like, in words (never the bytes themselves: they may be PHI)."""
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1") or head[4:8] == b"ftyp":
        return "an ISO media file (HEIC / MP4)"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "a JPEG 2000 file (send it inside a DICOM object)"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "JSON text"
    if stripped[:1] == b"<":
        return "XML / HTML text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    printable = text and all(c.isprintable() or c in "\r\n\t" for c in text)
    return "text" if printable else "unrecognised binary data"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    content_type: str | None = None,
    filename: str | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> DecodedImage:
    """Decode an uploaded PNG / JPEG / DICOM (or TIFF / BMP / GIF / WebP) to grayscale.

    Args:
        data: the uploaded bytes.
        content_type: the declared media type, if any; only compared with the bytes.
        filename: the uploaded file name, if any; only its extension is compared.
        limits: size limits (:class:`DecodeLimits`).

    Returns:
        a :class:`DecodedImage` with ``(H, W)`` float32 pixels in [0, 1].

    Raises:
        UnprocessableImageError: empty, truncated or corrupt data, DICOM without pixel data
            or with inconsistent sizes, an unsupported transfer syntax or missing codec,
            an image smaller than ``limits.min_side``, pixel values that come out NaN or
            infinite (an overflowing rescale) (422).
        PayloadTooLargeError: more than ``limits.max_bytes`` bytes or ``limits.max_pixels``
            pixels per frame (413), checked before decoding.
        UnsupportedMediaTypeError: not an image kind we read (415).
    """
    if not data:
        raise UnprocessableImageError("empty file")
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"upload is {len(data)} bytes; the limit is {limits.max_bytes} bytes"
            f"{_mib(limits.max_bytes)}"
        )
    kind = sniff_kind(data)
    if kind is None:
        declared = f"content type {content_type[:100]!r}, " if content_type else ""
        raise UnsupportedMediaTypeError(
            f"unsupported file: received {declared}{_describe_unknown(data)} "
            f"({len(data)} bytes); accepted: {ACCEPTED}"
        )
    notes = _declared_type_notes(kind, content_type, filename)
    try:
        decoded = (
            _decode_dicom(data, limits, notes)
            if kind == "dicom"
            else _decode_pil(data, kind, limits, notes)
        )
    except ServiceError:
        raise
    except MemoryError:
        raise PayloadTooLargeError(f"the {kind.upper()} image is too large to decode") from None
    except Exception as e:  # a decoder bug or an input no check foresaw: 422, never a 500
        log.warning(
            "decoding a %s failed: %s",
            kind,
            type(e).__name__,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        raise UnprocessableImageError(
            f"cannot decode the {kind.upper()} image ({type(e).__name__})"
        ) from None
    # The model refuses a batch holding one non-finite pixel: such an image must never
    # reach it, or it fails every request batched with it.
    if not np.isfinite(decoded.pixels).all():
        raise UnprocessableImageError(
            f"the {kind.upper()} image holds NaN or infinite pixel values"
        )
    return decoded


def _declared_type_notes(kind: str, content_type: str | None, filename: str | None) -> list[str]:
    notes: list[str] = []
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in _GENERIC_TYPES and declared not in CONTENT_TYPES.get(kind, ()):
        notes.append(
            f"content type {declared!r} does not match the file's bytes; decoded as {kind.upper()}"
        )
    suffix = PurePath(filename).suffix.lower() if filename else ""
    known = {ext for exts in _EXTENSIONS.values() for ext in exts}
    if suffix in known and suffix not in _EXTENSIONS.get(kind, ()):
        notes.append(
            f"file name extension {suffix!r} does not match the file's bytes; decoded as "
            f"{kind.upper()}"
        )
    return notes


# ---------------------------------------------------------------------------------------------
# PNG, JPEG and other Pillow formats
# ---------------------------------------------------------------------------------------------


def _decode_pil(data: bytes, kind: str, limits: DecodeLimits, notes: list[str]) -> DecodedImage:
    label = kind.upper()
    _allow_pil_pixels(limits.max_pixels)
    try:
        # lazy: reads the header only; restricted to the sniffed format's plugin
        image = Image.open(BytesIO(data), formats=[_PIL_FORMATS[kind]])
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(
            f"{label} header claims more than {limits.max_pixels} pixels (the limit); "
            "refused before decoding"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnprocessableImageError(
            f"truncated or corrupt {label}: cannot read the header ({_reason(e)})"
        ) from None
    with image:
        width, height = image.size
        _check_size(width, height, label, limits)
        if getattr(image, "is_animated", False):
            notes.append(f"multi-frame {label}: used frame 1 of {getattr(image, 'n_frames', 1)}")
        try:
            image.load()
        except Exception as e:  # OSError for truncation, zlib / struct errors for corruption
            raise UnprocessableImageError(f"truncated or corrupt {label}: {_reason(e)}") from None
        pixels = _pil_gray(image, notes)
    h, w = pixels.shape
    return DecodedImage(pixels=pixels, kind=kind, width=w, height=h, notes=notes)


def _allow_pil_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to ``max_pixels`` (it refuses twice its own limit)."""
    with _PIL_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _pil_gray(image: Image.Image, notes: list[str]) -> np.ndarray:
    """A loaded Pillow image -> ``(H, W)`` float32 in [0, 1] (the rules of
    :func:`models.data.pil_to_array`, with fast paths for the common modes)."""
    orientation = image.getexif().get(0x0112, 1)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        notes.append("EXIF orientation applied")
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        notes.append("16-bit image scaled by its bit range")
        return _uint16_to_unit(np.asarray(image))
    if mode.startswith("I") or mode == "F":
        notes.append(f"{'float' if mode == 'F' else '32-bit'} image scaled to [0, 1]")
        return pil_to_array(image)
    if mode in ("P", "PA"):
        notes.append("palette image converted to gray")
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "L")
        mode = image.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        image = _drop_alpha(image, notes)
        mode = image.mode
    if mode != "L":
        if mode != "1":
            notes.append(f"{mode} converted to gray")
        image = image.convert("L")
    out = np.asarray(image).astype(np.float32)
    out /= np.float32(255.0)  # in place: the same values as pil_to_array, one allocation
    return out


def _drop_alpha(image: Image.Image, notes: list[str]) -> Image.Image:
    """Composite on black where transparent (what a viewer on a dark screen shows)."""
    if image.mode in ("RGBa", "La"):  # premultiplied already: on black by definition
        notes.append("alpha channel dropped")
        return image.convert("RGB" if image.mode == "RGBa" else "L")
    rgba = image.convert("RGBA")
    low, _ = rgba.getchannel("A").getextrema()
    if low == 255:
        notes.append("alpha channel dropped (fully opaque)")
        return image.convert("RGB" if image.mode == "RGBA" else "L")
    notes.append("transparent pixels composited on black")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    out = Image.alpha_composite(black, rgba)
    return out.convert("L") if image.mode == "LA" else out.convert("RGB")


def _uint16_to_unit(values: np.ndarray) -> np.ndarray:
    """16-bit values divided by ``2**bits - 1``, ``bits`` the data's bit length (>= 8)."""
    hi = int(values.max()) if values.size else 0
    bits = max(8, hi.bit_length())
    out = values.astype(np.float32)
    out *= np.float32(1.0 / (2**bits - 1))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _check_size(width: int, height: int, label: str, limits: DecodeLimits) -> None:
    pixels = width * height
    if pixels > limits.max_pixels:
        raise PayloadTooLargeError(
            f"{label} is {width}x{height} = {pixels} pixels; the limit is {limits.max_pixels} "
            "pixels per image"
        )
    if min(width, height) < limits.min_side:
        raise UnprocessableImageError(
            f"image too small: {width}x{height} pixels; each side must be at least "
            f"{limits.min_side}"
        )


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def _decode_dicom(data: bytes, limits: DecodeLimits, notes: list[str]) -> DecodedImage:
    try:
        check_inflated_size(BytesIO(data), limits.max_bytes)
    except DeflateBombError as e:
        raise PayloadTooLargeError(f"{e} (the upload limit)") from None
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True, defer_size=_DEFER_SIZE)
    except Exception as e:  # pydicom raises many types on corrupt input
        raise UnprocessableImageError(f"truncated or corrupt DICOM: {_reason(e)}") from None
    if len(ds) == 0:  # pydicom gives up silently on an unterminated (encapsulated) element
        raise UnprocessableImageError(
            "truncated or corrupt DICOM: no data element could be read after the file meta"
        )
    tsuid = _transfer_syntax(ds, notes)
    pixel_tag = next((tag for tag in _PIXEL_TAGS if tag in ds), None)
    if pixel_tag is None:
        sop_class = _sop_class(ds)
        if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class:
            raise UnprocessableImageError(
                f"DICOM has no pixel data (SOP class {sop_class}; truncated file?)"
            )
        raise UnprocessableImageError(f"DICOM has no pixel data (SOP class {sop_class})")

    rows = _int_tag(ds, "Rows")
    cols = _int_tag(ds, "Columns")
    frames = _int_tag(ds, "NumberOfFrames", default=1) or 1
    if rows < 1 or cols < 1 or frames < 1:
        raise UnprocessableImageError(
            f"inconsistent DICOM: Rows {rows}, Columns {cols}, Number of Frames {frames}"
        )
    _check_size(cols, rows, "DICOM image", limits)
    _check_transfer_syntax(tsuid)
    if pixel_tag == "PixelData" and not tsuid.is_encapsulated:
        _check_native_length(ds, data, tsuid, rows, cols, frames)
    elif pixel_tag == "PixelData":
        _check_codestream_size(ds, frames, rows, cols, limits)

    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or None
    try:
        pixels = dicom_to_array(ds, frame=0)
    except DataError as e:
        # The reason may list each decoder's complaint (pydicom tries every plugin).
        reason = _reason(e, limit=400).removeprefix("cannot decode DICOM pixel data: ")
        raise UnprocessableImageError(
            f"cannot decode DICOM pixel data ({tsuid.name}): {reason}"
        ) from None
    if pixels.shape != (rows, cols):
        raise UnprocessableImageError(
            f"inconsistent DICOM: decoded a {pixels.shape} frame but Rows x Columns is "
            f"{rows}x{cols}"
        )

    if frames > 1:
        notes.append(f"multi-frame DICOM: used frame 1 of {frames}")
    if photometric == "MONOCHROME1":
        notes.append("MONOCHROME1 inverted")
    elif photometric and not photometric.startswith("MONOCHROME"):
        notes.append(f"{photometric} converted to gray")
    elif not (ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds)):
        notes.append("DICOM has no window or VOI LUT: values min-max scaled")
    modality = _str_tag(ds, "Modality")
    if modality in _NOT_RADIOGRAPH:
        notes.append(f"modality {modality} is not a projection radiograph (DX / CR)")
    info = DicomInfo(
        study_uid=_str_tag(ds, "StudyInstanceUID"),
        series_uid=_str_tag(ds, "SeriesInstanceUID"),
        sop_instance_uid=_str_tag(ds, "SOPInstanceUID"),
        sop_class_uid=_str_tag(ds, "SOPClassUID"),
        modality=modality,
        view_position=_str_tag(ds, "ViewPosition"),
        photometric=photometric,
        frames=frames,
        transfer_syntax=str(tsuid),
    )
    return DecodedImage(
        pixels=pixels, kind="dicom", width=cols, height=rows, notes=notes, dicom=info
    )


def _check_codestream_size(
    ds: Dataset, frames: int, rows: int, cols: int, limits: DecodeLimits
) -> None:
    """Refuse a compressed first frame whose own header declares another size than Rows x
    Columns (413 over the pixel limit, else 422), before the decoder allocates for it."""
    try:
        first = next(generate_fragmented_frames(ds.PixelData, number_of_frames=frames))[0]
    except Exception:
        return  # unreadable encapsulation: the decoder names the problem
    size = frame_size(first)
    if size is None:
        return
    width, height = size
    _check_size(width, height, "the compressed frame", limits)
    if (width, height) != (cols, rows):
        raise UnprocessableImageError(
            f"inconsistent DICOM: the compressed frame is {width}x{height} but Columns x "
            f"Rows is {cols}x{rows}"
        )


def _transfer_syntax(ds: Dataset, notes: list[str]) -> UID:
    """The dataset's transfer syntax; without file meta, the encoding pydicom found."""
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsuid:
        return UID(str(tsuid))
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if little is False:
        uid = ExplicitVRBigEndian
    else:
        uid = ImplicitVRLittleEndian if implicit is not False else ExplicitVRLittleEndian
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = uid
    notes.append(f"DICOM has no transfer syntax in its file meta: read as {uid.name}")
    return uid


def _check_transfer_syntax(tsuid: UID) -> None:
    """Refuse a transfer syntax pydicom cannot decode here, naming it (422)."""
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise UnprocessableImageError(
            f"unsupported DICOM transfer syntax {tsuid.name} ({tsuid}): no decoder"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise UnprocessableImageError(
            f"no codec installed for DICOM transfer syntax {tsuid.name} ({tsuid}); needs {missing}"
        )


def _check_native_length(
    ds: Dataset, data: bytes, tsuid: UID, rows: int, cols: int, frames: int
) -> None:
    """Pixel Data of an uncompressed dataset must hold what Rows x Columns x ... say."""
    bits = _int_tag(ds, "BitsAllocated")
    samples = _int_tag(ds, "SamplesPerPixel", default=1) or 1
    if bits not in (1, 8, 16, 32, 64):
        raise UnprocessableImageError(f"inconsistent DICOM: Bits Allocated is {bits}")
    frame_bits = rows * cols * samples * bits
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "YBR_FULL_422":  # two chroma samples shared by each pair of pixels
        frame_bits = frame_bits // 3 * 2
    expected = (frame_bits * frames + 7) // 8
    actual = _pixel_data_length(ds, data, tsuid)
    if actual < expected:
        raise UnprocessableImageError(
            f"inconsistent DICOM: Pixel Data holds {actual} bytes but Rows {rows} x Columns "
            f"{cols} x {samples} sample(s) x {bits} bits x {frames} frame(s) needs {expected} "
            "(truncated file or wrong header)"
        )
    frame_bytes = frame_bits // 8
    if frame_bytes and actual - expected >= max(frame_bytes, 2):
        raise UnprocessableImageError(
            f"inconsistent DICOM: Pixel Data holds {actual} bytes, more than Rows {rows} x "
            f"Columns {cols} x {samples} sample(s) x {bits} bits x {frames} frame(s) = "
            f"{expected} (wrong Rows / Columns / Number of Frames?)"
        )


def _pixel_data_length(ds: Dataset, data: bytes, tsuid: UID) -> int:
    """Bytes of Pixel Data present, without reading a deferred value (a deflated dataset's
    offsets are in the inflated stream, so its value is read)."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    deferred = isinstance(elem, RawDataElement) and elem.value is None
    if deferred and tsuid != DeflatedExplicitVRLittleEndian:
        assert isinstance(elem, RawDataElement)
        present = len(data) - int(elem.value_tell)
        return max(0, min(int(elem.length), present))
    value = ds.PixelData
    return len(value) if isinstance(value, (bytes, bytearray)) else 0


def _int_tag(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise UnprocessableImageError(f"DICOM image has no {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UnprocessableImageError(f"DICOM {keyword} is not an integer") from None


def _str_tag(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID")
    if not uid:
        return "unknown"
    uid = UID(str(uid))
    return uid.name if uid.name != str(uid) else str(uid)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _reason(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, shortened (no traceback, no dumps); a first
    line that ends in a colon heads a list (one line per decoder), which is joined to it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {'; '.join(lines[1:])}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mib(n: int) -> str:
    return f" ({n / 2**20:g} MiB)" if n >= 2**20 else ""
