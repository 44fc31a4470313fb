"""The frame size a compressed DICOM frame's own codestream declares, read from its header.

A DICOM's Rows and Columns may say 64 x 64 while its JPEG frame is 20000 x 20000: the decoder
follows the codestream and allocates for it. Reading the size from the codestream header
(JPEG and JPEG-LS start-of-frame, JPEG 2000 SIZ) lets the pixel limit hold before any pixel
is decoded. Other encodings (RLE, deflate) decode to Rows x Columns by construction.
"""

from __future__ import annotations

import struct

# JPEG start-of-frame markers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC); F7 is
# JPEG-LS's SOF55.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
# Markers that stand alone (no length field).
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ
_MAX_SCAN = 1 << 20  # a header lies near the start; do not walk a whole frame


def frame_size(fragment: bytes) -> tuple[int, int] | None:
    """``(width, height)`` the codestream at the start of ``fragment`` declares, or ``None``
    when it is not a JPEG / JPEG-LS / JPEG 2000 codestream or its header cannot be read."""
    if fragment[:2] == b"\xff\xd8":
        return _jpeg_size(fragment)
    at = fragment.find(_J2K_SIZ, 0, _MAX_SCAN)  # a raw codestream, or inside a JP2 box
    if at >= 0:
        return _j2k_size(fragment, at + 2)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    end = min(len(data), _MAX_SCAN)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _j2k_size(data: bytes, siz: int) -> tuple[int, int] | None:
    # SIZ: marker (2), Lsiz (2), Rsiz (2), Xsiz, Ysiz, XOsiz, YOsiz (4 each)
    if siz + 22 > len(data):
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[siz + 6 : siz + 22])
    if xsiz <= xo or ysiz <= yo:
        return None
    return xsiz - xo, ysiz - yo
