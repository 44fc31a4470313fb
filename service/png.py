"""A fast writer of 8-bit grayscale PNG files.

Pillow's PNG encoder costs about 1.3 ms for a 256 x 194 image even at ``compress_level=1``
(2.2 ms of it zlib's deflate for a 512 x 512 one), and the service writes one such thumbnail
per request. Here every row uses the PNG "Sub" filter (one numpy pass) and the deflate is
Intel ISA-L's (``isal``, level 1), which writes the same zlib format about five times faster
than zlib at a like size: a valid PNG for a tenth of Pillow's CPU time.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

__all__ = ["gray_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB = 1  # PNG filter type: each byte minus the byte to its left


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def gray_png(image: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of a 2-D ``uint8`` image (color type 0, bit depth 8, not interlaced);
    ``level`` is ISA-L's, 0 to 3.

    Raises:
        ValueError: ``image`` is not a non-empty 2-D ``uint8`` array.
    """
    if image.dtype != np.uint8 or image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"expected a non-empty 2-D uint8 image, got {image.dtype} {image.shape}")
    rows, cols = image.shape
    raw = np.empty((rows, cols + 1), dtype=np.uint8)
    raw[:, 0] = _SUB
    raw[:, 1] = image[:, 0]
    np.subtract(image[:, 1:], image[:, :-1], out=raw[:, 2:])  # wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", isal_zlib.compress(raw.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


#: The only chunks a PNG may hold to be stored as it came (see :func:`is_plain_gray_png`).
_PLAIN_CHUNKS = (b"IHDR", b"IDAT", b"IEND")
#: Most chunks such a PNG may have (encoders write IDAT in 8-64 kB pieces).
_MAX_PLAIN_CHUNKS = 256
#: Bytes a plain PNG may have beyond its raw scanlines (signature, chunk framing, zlib
#: header and stored-block overhead): a larger file carries more than its pixels.
_PLAIN_SLACK = 4096


def is_plain_gray_png(data: bytes, width: int, height: int) -> bool:
    """Whether ``data`` is a ``width`` x ``height`` 8-bit grayscale PNG (color type 0, not
    interlaced) made of IHDR, IDAT and IEND chunks alone, every CRC right, nothing after
    IEND, and no larger than its raw scanlines plus framing.

    Such a file has no text, EXIF, time, gamma or transparency chunk where metadata could
    sit, and no room for much beside its pixels (the compressed stream itself is not
    inflated: its pixels must already have decoded). The service stores such an upload as
    its own thumbnail (:func:`service.pipeline.thumbnail_for`).
    """
    if not data.startswith(_SIGNATURE) or len(data) > height * (width + 1) + _PLAIN_SLACK:
        return False
    pos, end = len(_SIGNATURE), len(data)
    for index in range(_MAX_PLAIN_CHUNKS):
        if pos + 12 > end:
            return False
        (length,) = struct.unpack_from(">I", data, pos)
        tag = data[pos + 4 : pos + 8]
        stop = pos + 8 + length
        if tag not in _PLAIN_CHUNKS or (index == 0) != (tag == b"IHDR") or stop + 4 > end:
            return False
        (crc,) = struct.unpack_from(">I", data, stop)
        if zlib.crc32(data[pos + 4 : stop]) != crc:
            return False
        if index == 0:
            header = struct.unpack_from(">IIBBBBB", data, pos + 8) if length == 13 else None
            if header != (width, height, 8, 0, 0, 0, 0):
                return False
        pos = stop + 4
        if tag == b"IEND":
            return pos == end
    return False
