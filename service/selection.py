"""Which instances of a study the model scores: frontal chest radiographs, and nothing else.

A PACS forwards whole studies: frontal and lateral views, scout images, presentation
states, key object selections, dose reports, our own SR coming back. The model is trained
on frontal projection radiographs, so everything else is skipped, each with a reason a
person can read (shown by ``GET /v1/studies/{uid}``).

Two steps:

- :func:`classify` judges one instance on its own header fields (SOP class, Modality,
  ViewPosition). Its verdict is final: a lateral view stays a lateral view. The job queue
  uses it when a study turns into a job, so a study whose only new instance is a
  non-image object (our SR re-forwarded by the PACS) makes no new job.
- :func:`select_instances` chooses among the instances that passed, in the context of the
  whole job: explicit frontal views win over instances with no ViewPosition, and
  for-presentation images over for-processing ones.

Decisions (where DICOM leaves room):

- **Modality** CR or DX. ``DR`` is not a DICOM defined term, but some vendors write it
  for digital radiography; it is accepted with a note.
- **SOP class** CR Image Storage, or Digital X-Ray Image Storage (for presentation or for
  processing). Other image classes (CT, MR, Secondary Capture, mammography...) are skipped:
  a secondary capture may be a screenshot of anything.
- **ViewPosition** PA or AP is frontal. LL, RL, LATERAL, oblique and decubitus views are
  skipped. An *empty* ViewPosition is common in real exports (the view is often only in
  free text); such an instance is accepted with a note, unless the same job has an
  instance explicitly marked PA or AP, which is scored instead.
- **Several frontal images**: each is scored and gets its own result (a repeat exposure
  or a PA plus an AP is worth reading twice); the SR references every scored image.
- **For processing**: DX For Processing images are raw detector data, not meant for
  display; they are scored only when the job has no for-presentation frontal image.

Example::

    reason = classify(row).reason            # None: may be scored
    chosen = select_instances(rows)
    chosen.selected, chosen.skipped, chosen.notes
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from pydicom.uid import UID

__all__ = [
    "ACCEPTED_MODALITIES",
    "FRONTAL_VIEWS",
    "RADIOGRAPH_SOP_CLASSES",
    "Instance",
    "Selection",
    "Verdict",
    "classify",
    "is_image_sop_class",
    "select_instances",
]

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"

#: Image SOP classes of projection radiography the model can read.
RADIOGRAPH_SOP_CLASSES = frozenset(
    {CR_IMAGE_STORAGE, DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE}
)
#: Modalities accepted (``DR`` is a vendor value, not a DICOM defined term: noted).
ACCEPTED_MODALITIES = frozenset({"CR", "DX", "DR"})
#: ViewPosition values meaning a frontal projection.
FRONTAL_VIEWS = frozenset({"PA", "AP"})

NOTE_NO_VIEW = "ViewPosition is empty: assumed frontal"
NOTE_DR = "Modality DR is not a DICOM defined term: read as DX"
NOTE_PROCESSING = "a for-processing image was scored: the study has no for-presentation one"


class Instance(Protocol):
    """What selection reads of a stored instance (a ``svc_instances`` row has these)."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str | None: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def view_position(self) -> str | None: ...


InstanceT = TypeVar("InstanceT", bound=Instance)
T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    """:func:`classify`'s answer for one instance.

    Attributes:
        reason: why it is skipped; ``None`` when it may be scored.
        note: a caveat for an accepted instance (e.g. no ViewPosition).
    """

    reason: str | None
    note: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass
class Selection(Generic[T]):
    """:func:`select_instances`' answer for one job.

    Attributes:
        selected: the instances to score, in the order given.
        skipped: ``(instance, reason)`` for every other instance.
        notes: SOPInstanceUID -> caveats of a selected instance (go into its result).
    """

    selected: list[T] = field(default_factory=list)
    skipped: list[tuple[T, str]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)


def _clean(value: object) -> str:
    return str(value or "").strip().rstrip("\x00").strip().upper()


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def is_image_sop_class(uid: str) -> bool:
    """Whether ``uid`` is a storage class of images (pixel data), by its registered name.

    SR, presentation states, key object selections, waveforms, encapsulated documents and
    raw data are not; unknown (private) classes are not either.
    """
    return "Image Storage" in UID(uid).name


def classify(instance: Instance) -> Verdict:
    """Whether one instance may be scored, judged on its own header fields."""
    sop_class = _clean(instance.sop_class_uid)
    modality = _clean(instance.modality)
    view = _clean(instance.view_position)
    if not sop_class:
        return Verdict("no SOP Class UID")
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        if not is_image_sop_class(sop_class):
            return Verdict(f"non-image SOP class {_sop_class_name(sop_class)}")
        return Verdict(
            f"not a projection radiograph: {_sop_class_name(sop_class)}, "
            f"modality {modality or 'empty'}"
        )
    if modality not in ACCEPTED_MODALITIES:
        return Verdict(f"modality {modality or 'empty'} is not CR or DX")
    note = NOTE_DR if modality == "DR" else None
    if not view:
        return Verdict(None, NOTE_NO_VIEW if note is None else f"{note}; {NOTE_NO_VIEW}")
    if view not in FRONTAL_VIEWS:
        return Verdict(f"view position {view} is not frontal (PA or AP)")
    return Verdict(None, note)


def select_instances(instances: Iterable[InstanceT]) -> Selection[InstanceT]:
    """Choose what to score among a job's instances (see the module notes for the rules)."""
    chosen: Selection[InstanceT] = Selection()
    passed: list[tuple[InstanceT, Verdict]] = []
    for instance in instances:
        verdict = classify(instance)
        if verdict.accepted:
            passed.append((instance, verdict))
        else:
            assert verdict.reason is not None
            chosen.skipped.append((instance, verdict.reason))
    explicit = [p for p in passed if _clean(p[0].view_position)]
    presentation = [p for p in passed if _clean(p[0].sop_class_uid) != DX_PROCESSING_STORAGE]
    for instance, verdict in passed:
        if explicit and not _clean(instance.view_position):
            chosen.skipped.append(
                (instance, "view position not recorded; the study has an explicit PA or AP view")
            )
            continue
        processing = _clean(instance.sop_class_uid) == DX_PROCESSING_STORAGE
        if processing and _any_kept(presentation, explicit):
            chosen.skipped.append(
                (instance, "for-processing image; a for-presentation frontal image is scored")
            )
            continue
        notes = [verdict.note] if verdict.note else []
        if processing:
            notes.append(NOTE_PROCESSING)
        chosen.selected.append(instance)
        if notes:
            chosen.notes[instance.sop_instance_uid] = notes
    return chosen


def _any_kept(
    presentation: Sequence[tuple[InstanceT, Verdict]], explicit: Sequence[tuple[InstanceT, Verdict]]
) -> bool:
    """Whether some for-presentation image survives the explicit-view rule."""
    return any(not explicit or _clean(i.view_position) for i, _ in presentation)
