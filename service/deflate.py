"""A bound on how far a Deflated Explicit VR Little Endian DICOM data set inflates.

pydicom inflates a deflated data set (transfer syntax 1.2.840.10008.1.2.1.99) with one
unbounded ``zlib.decompress`` as it reads the file, so 200 KB on the wire can become
gigabytes in memory before any size check runs. :func:`check_inflated_size` walks the file
meta by hand (group 0002 is always explicit VR little endian) and, for a deflated data set
only, inflates the rest in bounded steps, counting, before pydicom sees it.

Example::

    with open(path, "rb") as fp:
        check_inflated_size(fp, limit=50 * 2**20)   # raises DeflateBombError beyond
    ds = pydicom.dcmread(path)
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

DEFLATED = "1.2.840.10008.1.2.1.99"
_CHUNK = 64 * 1024
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}  # fmt: skip


class DeflateBombError(ValueError):
    """A deflated data set inflates beyond the limit."""


def check_inflated_size(fp: BinaryIO, limit: int) -> None:
    """Raise :class:`DeflateBombError` if ``fp`` holds a deflated data set that inflates to
    more than ``limit`` bytes; otherwise return, leaving ``fp`` at its start.

    Anything else (no file meta, another transfer syntax, a corrupt meta or stream) passes:
    the DICOM reader reports those.
    """
    try:
        offset = _deflated_offset(fp)
        if offset is None:
            return
        fp.seek(offset)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        pending = b""
        while not inflater.eof:
            if not pending:
                pending = fp.read(_CHUNK)
                if not pending:
                    pending = b""  # input is over: flush what the inflater still holds
            # max_length bounds what one call may produce; the input it did not use yet
            # comes back as unconsumed_tail.
            produced = len(inflater.decompress(pending, _CHUNK))
            total += produced
            if total > limit:
                raise DeflateBombError(
                    f"the deflated DICOM data set inflates to more than {limit} bytes"
                )
            tail = inflater.unconsumed_tail
            if not produced and not tail and not pending:
                break  # no input left and nothing more comes out: a truncated stream
            pending = tail
    except zlib.error:
        return  # a corrupt stream: the DICOM reader refuses it with its own message
    finally:
        fp.seek(0)


def _deflated_offset(fp: BinaryIO) -> int | None:
    """Where the data set starts, if the file meta names the deflated transfer syntax."""
    fp.seek(0)
    head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None  # no file meta: the data set cannot be declared deflated
    syntax = None
    while True:
        pos = fp.tell()
        tag = fp.read(6)
        if len(tag) < 6:
            return None
        group, _element = struct.unpack("<HH", tag[:4])
        if group != 0x0002:
            fp.seek(pos)
            break
        vr = tag[4:6]
        if vr in _LONG_VRS:
            raw = fp.read(6)
            if len(raw) < 6:
                return None
            length = struct.unpack("<I", raw[2:])[0]
        else:
            raw = fp.read(2)
            if len(raw) < 2:
                return None
            length = struct.unpack("<H", raw)[0]
        if length == 0xFFFFFFFF:
            return None  # undefined length in the file meta: corrupt, let the reader say so
        value = fp.read(length)
        if tag[:4] == b"\x02\x00\x10\x00":  # (0002,0010) TransferSyntaxUID
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return fp.tell() if syntax == DEFLATED else None
