"""Deflated DICOM data sets are measured as they inflate, in bounded steps."""

from __future__ import annotations

import io

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from service.deflate import DeflateBombError, check_inflated_size
from tests.service import images


def _deflated(inflated: int) -> bytes:
    ds = images.dicom_dataset(rows=32, columns=32, bits=8)
    ds.add_new(0x00091010, "OB", b"\0" * inflated)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return images.write_dicom(ds)


def test_a_bomb_is_refused_and_a_real_deflated_file_passes() -> None:
    bomb = _deflated(8 * 2**20)
    assert len(bomb) < 64 * 1024
    with pytest.raises(DeflateBombError, match="more than 1048576 bytes"):
        check_inflated_size(io.BytesIO(bomb), 2**20)
    check_inflated_size(io.BytesIO(bomb), 16 * 2**20)
    real = open(get_testdata_file("image_dfl.dcm"), "rb").read()  # noqa: SIM115
    check_inflated_size(io.BytesIO(real), 2**20)
    with pytest.raises(DeflateBombError):
        check_inflated_size(io.BytesIO(real), 1000)


@pytest.mark.parametrize("cut", [140, 400, 2000])
def test_truncated_or_other_files_pass_to_the_reader(cut: int) -> None:
    real = open(get_testdata_file("image_dfl.dcm"), "rb").read()  # noqa: SIM115
    fp = io.BytesIO(real[:cut])
    check_inflated_size(fp, 2**20)  # the DICOM reader reports what is wrong
    assert fp.tell() == 0
    check_inflated_size(io.BytesIO(images.dicom_bytes(bits=8)), 10)  # not deflated
    check_inflated_size(io.BytesIO(b"not dicom"), 10)
