"""DICOM pixel data -> a display-ready grayscale array in [0, 1].

The steps follow the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2) with pydicom's own
implementations: decode (any transfer syntax pydicom and the installed pylibjpeg plugins
handle), Modality LUT / rescale, VOI LUT or window, then MONOCHROME1 inversion. Colour images
(RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR) become luminance. Multi-frame
objects give one frame (the first by default). Shared by the datasets and the service.
"""

from __future__ import annotations

import logging
from typing import cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    pixel_array,
)

from models.errors import DataError

log = logging.getLogger(__name__)

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# ITU-R BT.601 luma weights, the same the DICOM YBR_FULL definition uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def dicom_to_array(ds: Dataset, frame: int = 0, voi_index: int = 0) -> np.ndarray:
    """Decode one frame of ``ds`` to a float32 grayscale image in [0, 1].

    Grayscale (MONOCHROME1/2): the Modality LUT or rescale slope/intercept is applied, then
    the VOI LUT Sequence (preferred) or Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID)
    with index ``voi_index``; the VOI output is scaled from its nominal output range (as
    pydicom defines it from Bits Stored, the rescale and the LUT descriptor) to [0, 1], so a
    window is shown as the modality intends, not stretched to the data. Without VOI
    information, or with an invalid window, the values are min-max scaled. MONOCHROME1 is
    inverted last, so bright always means dense (a Presentation LUT Shape of INVERSE on a
    MONOCHROME1 image is the same inversion, as the DX IOD requires, not a second one).

    Colour (RGB, YBR_* decoded to RGB, PALETTE COLOR through its LUT): BT.601 luminance,
    scaled by the largest value the stored bits can hold.

    Args:
        ds: a dataset with pixel data (read with ``pydicom.dcmread``).
        frame: which frame of a multi-frame object to decode (default 0, the first).
        voi_index: which of several VOI windows or LUTs to apply (default 0).

    Returns:
        ``(rows, columns)`` float32 array in [0, 1].

    Raises:
        DataError: no pixel data, a frame index out of range, a photometric interpretation
            or pixel format that cannot be decoded.
    """
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError("DICOM object has no pixel data (not an image)")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise DataError(f"frame must be in [0, {n_frames - 1}], got {frame}")
    try:
        arr = pixel_array(ds, index=frame) if n_frames > 1 else ds.pixel_array
    except Exception as e:  # decoders raise many types (missing plugin, corrupt stream)
        raise DataError(f"cannot decode DICOM pixel data: {e}") from e
    if arr.ndim == 3 and arr.shape[0] == 1 and int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[0]  # a single frame read through the multi-frame path

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise DataError(f"cannot apply the palette colour LUT: {e}") from e
        bits = _palette_bits(ds)
        return _luminance(arr, 2**bits - 1)
    if arr.ndim == 3:  # RGB or YBR (pydicom converts YBR_* to RGB when decoding)
        bits = int(ds.get("BitsStored", 8) or 8)
        return _luminance(arr, 2**bits - 1)
    if arr.ndim != 2:
        raise DataError(f"expected a 2-D frame, got pixel array of shape {arr.shape}")
    if photometric not in _MONOCHROME:
        raise DataError(f"unsupported Photometric Interpretation {photometric!r}")

    if "PixelData" not in ds:  # float pixel data: no LUTs apply
        out = _min_max(arr.astype(np.float64))
    else:
        out = _grayscale(arr, ds, voi_index)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _grayscale(arr: np.ndarray, ds: Dataset, voi_index: int) -> np.ndarray:
    """Modality LUT then VOI, scaled to [0, 1]. Shapes: (H, W) -> (H, W) float64."""
    try:
        values = apply_modality_lut(arr, ds)
    except Exception as e:  # a Rescale Slope / Intercept that is not a number, a broken LUT
        raise DataError(
            f"invalid Modality LUT or Rescale Slope / Intercept ({type(e).__name__})"
        ) from e
    voi_range = _voi_output_range(ds)
    if voi_range is not None:
        if ds.get("VOILUTSequence") and values.dtype.kind == "f":
            # a LUT is indexed by value; a rescale (even identity) gives floats
            values = np.rint(values).astype(np.int64)
        try:
            windowed = _apply_voi(values, ds, voi_index)
        except (ValueError, IndexError, KeyError, TypeError) as e:
            log.warning("ignoring invalid VOI LUT / window (%s); using min-max scaling", e)
        else:
            lo, hi = voi_range
            if hi > lo:
                out = (np.asarray(windowed, dtype=np.float64) - lo) / (hi - lo)
                return cast(np.ndarray, np.clip(out, 0.0, 1.0))
    return _min_max(values.astype(np.float64))


def _apply_voi(values: np.ndarray, ds: Dataset, voi_index: int) -> np.ndarray:
    """pydicom's VOI LUT / windowing, except for 8-bit LUTs longer than 256 entries.

    pydicom 3.0's ``apply_voi`` indexes an 8-bit LUT through a ``uint8`` array, so inputs
    above 255 wrap around; such LUTs (e.g. 4096 entries -> 8 bits on a 12-bit DX) are looked
    up here the same way (PS3.3 C.11.2.1.1: below the first mapped value -> first entry,
    beyond the last -> last entry).
    """
    seq = ds.get("VOILUTSequence")
    if seq:
        item = seq[voi_index]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        if bits == 8 and entries > 256:
            data = item.LUTData
            if isinstance(data, bytes):
                little = ds.original_encoding[1] is not False
                lut = np.frombuffer(data[: 2 * entries], dtype="<u2" if little else ">u2")
            else:
                lut = np.asarray(data, dtype=np.int64)
            index = np.clip(np.asarray(values, dtype=np.int64) - first, 0, len(lut) - 1)
            return cast(np.ndarray, lut[index])
    return apply_voi_lut(values, ds, index=voi_index, prefer_lut=True)


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The nominal output range of the VOI step pydicom will apply, or None without VOI.

    Mirrors ``pydicom.pixels.processing.apply_windowing`` (which maps a window onto the
    stored range, through the rescale) and the LUT descriptor's bit depth for a VOI LUT.
    """
    lut_seq = ds.get("VOILUTSequence")
    if lut_seq:
        descriptor = lut_seq[0].get("LUTDescriptor")
        if descriptor is None or len(descriptor) != 3:
            return None
        bits = int(descriptor[2])
        return 0.0, float(2**bits - 1)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    y_min: float
    y_max: float
    mlut = ds.get("ModalityLUTSequence")
    if mlut:
        y_min, y_max = 0.0, float(2 ** int(mlut[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


def _palette_bits(ds: Dataset) -> int:
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    if descriptor is not None and len(descriptor) == 3:
        return int(descriptor[2])
    return 8


def _luminance(rgb: np.ndarray, max_value: int) -> np.ndarray:
    """(H, W, 3) colour -> (H, W) float32 luminance in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise DataError(f"expected an (H, W, 3) colour frame, got shape {rgb.shape}")
    gray = rgb.astype(np.float64) @ _LUMA / float(max(max_value, 1))
    return np.ascontiguousarray(np.clip(gray, 0.0, 1.0), dtype=np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant image becomes zeros. NaNs become 0."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float64)
    return (values - lo) / (hi - lo)
