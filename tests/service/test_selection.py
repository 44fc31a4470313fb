"""Series / instance selection: frontal radiographs kept, everything else skipped with a reason."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from service.selection import (
    DX_PRESENTATION_STORAGE,
    DX_PROCESSING_STORAGE,
    NOTE_DR,
    NOTE_NO_VIEW,
    NOTE_PROCESSING,
    classify,
    is_image_sop_class,
    select_instances,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = DX_PRESENTATION_STORAGE
DXP = DX_PROCESSING_STORAGE
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KO = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass(frozen=True)
class Inst:
    sop_instance_uid: str
    sop_class_uid: str | None = DX
    modality: str | None = "DX"
    view_position: str | None = "PA"


@pytest.mark.parametrize(
    ("sop_class", "modality", "view"),
    [
        (DX, "DX", "PA"),
        (DX, "DX", "AP"),
        (CR, "CR", "PA"),
        (CR, "CR", "ap"),  # case and padding do not matter
        (DX, "DX", " PA "),
        (DXP, "DX", "PA"),
    ],
)
def test_frontal_radiographs_are_accepted(sop_class: str, modality: str, view: str) -> None:
    verdict = classify(Inst("1", sop_class, modality, view))
    assert verdict.accepted
    assert verdict.note is None


@pytest.mark.parametrize(
    ("sop_class", "modality", "view", "expected"),
    [
        (BASIC_TEXT_SR, "SR", None, "non-image SOP class Basic Text SR Storage"),
        (COMPREHENSIVE_3D_SR, "SR", None, "non-image SOP class Comprehensive 3D SR Storage"),
        (GSPS, "PR", None, "non-image SOP class Grayscale Softcopy Presentation State"),
        (KO, "KO", None, "non-image SOP class Key Object Selection"),
        (CT, "CT", None, "not a projection radiograph: CT Image Storage"),
        (SC, "OT", None, "not a projection radiograph: Secondary Capture Image Storage"),
        (MG, "MG", None, "not a projection radiograph: Digital Mammography"),
        (DX, "DX", "LL", "view position LL is not frontal"),
        (DX, "DX", "RL", "view position RL is not frontal"),
        (CR, "CR", "LAT", "view position LAT is not frontal"),
        (DX, "DX", "LATERAL", "view position LATERAL is not frontal"),
        (DX, "DX", "RLD", "view position RLD is not frontal"),
        (DX, "CT", "PA", "modality CT is not CR or DX"),
        (DX, None, "PA", "modality empty is not CR or DX"),
        (None, "DX", "PA", "no SOP Class UID"),
        ("1.2.3.4.5", "DX", "PA", "non-image SOP class 1.2.3.4.5"),
    ],
)
def test_everything_else_is_skipped_with_a_reason(
    sop_class: str | None, modality: str | None, view: str | None, expected: str
) -> None:
    verdict = classify(Inst("1", sop_class, modality, view))
    assert not verdict.accepted
    assert verdict.reason is not None
    assert verdict.reason.startswith(expected), verdict.reason


def test_sop_class_kinds() -> None:
    assert is_image_sop_class(DX) and is_image_sop_class(CT) and is_image_sop_class(SC)
    assert not is_image_sop_class(BASIC_TEXT_SR)
    assert not is_image_sop_class(GSPS)
    assert not is_image_sop_class(KO)
    assert not is_image_sop_class("1.2.3")


def test_empty_view_position_is_accepted_with_a_note() -> None:
    verdict = classify(Inst("1", view_position=None))
    assert verdict.accepted and verdict.note == NOTE_NO_VIEW
    chosen = select_instances([Inst("1", view_position="")])
    assert [i.sop_instance_uid for i in chosen.selected] == ["1"]
    assert chosen.notes == {"1": [NOTE_NO_VIEW]}


def test_dr_modality_is_read_as_dx_with_a_note() -> None:
    verdict = classify(Inst("1", modality="DR"))
    assert verdict.accepted and verdict.note == NOTE_DR
    both = classify(Inst("1", modality="DR", view_position=None))
    assert both.note == f"{NOTE_DR}; {NOTE_NO_VIEW}"


def test_explicit_frontal_views_win_over_unrecorded_ones() -> None:
    chosen = select_instances([Inst("none", view_position=None), Inst("pa", view_position="PA")])
    assert [i.sop_instance_uid for i in chosen.selected] == ["pa"]
    assert [(i.sop_instance_uid, r) for i, r in chosen.skipped] == [
        ("none", "view position not recorded; the study has an explicit PA or AP view")
    ]


def test_every_frontal_image_is_scored() -> None:
    chosen = select_instances(
        [Inst("pa"), Inst("lat", view_position="LL"), Inst("ap", view_position="AP")]
    )
    assert [i.sop_instance_uid for i in chosen.selected] == ["pa", "ap"]
    assert [i.sop_instance_uid for i, _ in chosen.skipped] == ["lat"]
    assert chosen.notes == {}


def test_for_processing_only_when_nothing_for_presentation() -> None:
    chosen = select_instances([Inst("raw", DXP), Inst("shown", DX)])
    assert [i.sop_instance_uid for i in chosen.selected] == ["shown"]
    assert chosen.skipped[0][1].startswith("for-processing image")
    alone = select_instances([Inst("raw", DXP)])
    assert [i.sop_instance_uid for i in alone.selected] == ["raw"]
    assert alone.notes == {"raw": [NOTE_PROCESSING]}
    # a presentation image without a view loses to an explicit for-processing view
    mixed = select_instances([Inst("raw", DXP), Inst("shown", DX, view_position=None)])
    assert [i.sop_instance_uid for i in mixed.selected] == ["raw"]


def test_a_study_of_nothing_scorable_selects_nothing() -> None:
    chosen = select_instances(
        [Inst("sr", BASIC_TEXT_SR, "SR", None), Inst("lat", view_position="LL")]
    )
    assert chosen.selected == []
    assert len(chosen.skipped) == 2
