"""STOW-RS (DICOM PS3.18 §10.5): store the instances of a ``multipart/related`` body.

The stages, composed in :func:`stow`: **parse** the body as a stream into spool files
(:mod:`service.multipart`), **validate** each part (a DICOM file with SOP Instance, SOP Class,
Study and Series Instance UIDs, in the study the URL names), **store** it durably
(:meth:`service.instances.InstanceStore.store`, before any answer goes out), and **respond**
with a Store Instances Response in DICOM JSON (PS3.18 Annex I, :meth:`StowResult.to_json`).

Answer (``application/dicom+json``):

- ``00081190`` RetrieveURL of the study (type 2: empty when nothing was stored);
- ``00081199`` ReferencedSOPSequence, **always present** (an empty ``Value`` list when nothing
  was stored: Orthanc treats an answer without it as a failed transfer), one item per stored
  instance with ``00081150``, ``00081155``, ``00081190`` (instance RetrieveURL) and
  ``00081196`` WarningReason when there is a warning;
- ``00081198`` FailedSOPSequence, only when a part failed (Orthanc treats a non-empty one as
  a failure), one item per failed part with ``00081197`` FailureReason.

HTTP status (PS3.18 Table 10.5.3-1): 200 all stored; 202 some stored, with failures or
warnings; 409 none stored; 400 malformed body (no boundary, no closing delimiter, broken
part headers, no parts); 413 body or part count over the limits; 415 a Content-Type other
than ``multipart/related; type="application/dicom"``. The 400/413/415 answers carry the
service's JSON error body (``{"error": {...}}``, :mod:`service.error_handlers`), as no
instance was looked at; 200/202/409 carry the DICOM JSON above.

Failure and warning reasons (PS3.18 Table I.2-1 / I.2-2; codes beyond the table's are
allowed and are listed here, as the standard asks of a conformance statement):

========  =====================================================================================
0xA700    Refused: out of resources. Writing the instance failed for lack of space
          (``ENOSPC``, ``EDQUOT``) or memory; nothing of it was kept.
0xA900    Error: data set does not match SOP class. A DICOM file without (or with an invalid)
          SOP Instance, SOP Class, Study or Series Instance UID.
0xA901    Error: the instance's Study Instance UID differs from the one in the request URL
          (``POST /dicomweb/studies/{study}``). PS3.18 §10.5 names this case as a conflict
          without a code; 0xA901 (43265) in the A9xx family is what Microsoft's DICOM service
          answers, so clients that know that code understand it.
0xC000    Error: cannot understand. The part is not a DICOM file, or declares a media type
          other than ``application/dicom``.
0x0110    Processing failure: anything else (a database error); the client may retry.
0xB006    Warning, elements discarded: the SOP Instance UID was stored before with other
          bytes; the first copy is kept and the re-sent data discarded (Orthanc answers
          the same warning when it ignores an instance). A faithful re-send (same bytes) is
          plain success.
========  =====================================================================================

A non-image SOP class (an SR, a presentation state, ...) is stored like any instance, as a
PACS re-forwarding a study must not see our own SR refused, and is marked skipped with the
reason, so no job is made for it.

Example::

    result = await stow(request.stream(), request.headers.get("content-type"), store,
                        study_uid=None)
    JSONResponse(result.to_json(base_url), status_code=result.status,
                 media_type=DICOM_JSON)
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any

import anyio
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError

from service.deflate import DeflateBombError, check_inflated_size
from service.errors import BadRequestError
from service.failpoints import failpoint
from service.instances import UID_MAX, InstanceIdentity, InstanceStore, is_valid_uid
from service.logs import hash_uid
from service.multipart import (
    MultipartLimits,
    SpooledPart,
    parse_related_content_type,
    remove_spooled,
    spool_multipart,
)

__all__ = [
    "DICOM_JSON",
    "FailureReason",
    "InstanceResult",
    "StowResult",
    "WarningReason",
    "is_image_sop_class",
    "limits_from_settings",
    "process_part",
    "stow",
]

log = logging.getLogger("kgdx.stow")

#: Media type of the Store Instances Response.
DICOM_JSON = "application/dicom+json"
#: Values bigger than this stay on disk while the header is read.
_DEFER_SIZE = 64 * 1024
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM}


class FailureReason(IntEnum):
    """FailureReason (0008,1197) values this service answers (see the module docstring)."""

    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    STUDY_UID_MISMATCH = 0xA901
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


class WarningReason(IntEnum):
    """WarningReason (0008,1196) values this service answers."""

    ELEMENTS_DISCARDED = 0xB006


@dataclass(frozen=True)
class InstanceResult:
    """What became of one part.

    Args:
        index: position of the part in the body, from 0.
        sop_class_uid, sop_instance_uid, study_uid, series_uid: as far as known.
        stored: whether the instance is stored (now or before).
        created: whether this request added it.
        failure: why it was not stored.
        warning: why it was stored with a warning.
        skip_reason: why it will not be processed, for a stored instance.
        detail: a short explanation for the log (names attributes, never values).
    """

    index: int
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    stored: bool = False
    created: bool = False
    failure: FailureReason | None = None
    warning: WarningReason | None = None
    skip_reason: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class StowResult:
    """The outcome of one STOW-RS request.

    Args:
        instances: one result per part, in body order.
        study_uid: the study the answer's RetrieveURL names: the one in the URL, else the
            first stored instance's.
    """

    instances: list[InstanceResult]
    study_uid: str | None

    @property
    def stored(self) -> list[InstanceResult]:
        return [r for r in self.instances if r.stored]

    @property
    def failed(self) -> list[InstanceResult]:
        return [r for r in self.instances if not r.stored]

    @property
    def status(self) -> int:
        """200 all stored, 202 some stored with failures or warnings, 409 none stored."""
        stored = self.stored
        if not stored:
            return 409
        if len(stored) < len(self.instances) or any(r.warning for r in stored):
            return 202
        return 200

    def to_json(self, studies_url: str) -> dict[str, Any]:
        """The Store Instances Response as DICOM JSON.

        Args:
            studies_url: the absolute URL of ``/dicomweb/studies`` for RetrieveURLs.
        """
        base = studies_url.rstrip("/")
        ds = Dataset()
        ds.RetrieveURL = f"{base}/{self.study_uid}" if self.stored and self.study_uid else None
        failed = []
        for r in self.failed:
            item = _reference(r)
            item.FailureReason = int(r.failure or FailureReason.PROCESSING_FAILURE)
            failed.append(item)
        if failed:
            ds.FailedSOPSequence = Sequence(failed)
        referenced = []
        for r in self.stored:
            item = _reference(r)
            item.RetrieveURL = (
                f"{base}/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_instance_uid}"
            )
            if r.warning is not None:
                item.WarningReason = int(r.warning)
            referenced.append(item)
        ds.ReferencedSOPSequence = Sequence(referenced)
        return ds.to_json_dict()


def _reference(r: InstanceResult) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = r.sop_class_uid
    item.ReferencedSOPInstanceUID = r.sop_instance_uid
    return item


def is_image_sop_class(sop_class_uid: str) -> bool:
    """Whether the SOP class stores images (its registered name says "Image Storage").

    SRs, presentation states, key object selections, waveforms, encapsulated documents and
    unknown (private) classes are not.
    """
    return "Image Storage" in UID(sop_class_uid).name


#: Default bound on what one deflated data set may inflate to (``KGDX_MAX_INFLATED_BYTES``).
MAX_INFLATED_BYTES = 512 * 2**20


def limits_from_settings(settings: object) -> MultipartLimits:
    """Body limits from the service settings (``max_stow_bytes``, ``max_stow_parts``)."""
    defaults = MultipartLimits()
    return MultipartLimits(
        max_parts=int(getattr(settings, "max_stow_parts", defaults.max_parts)),
        max_bytes=int(getattr(settings, "max_stow_bytes", defaults.max_bytes)),
        max_header_bytes=defaults.max_header_bytes,
        buffer_bytes=defaults.buffer_bytes,
    )


# -- stages ----------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[Dataset, bool]:
    """The header of a DICOM file and whether it had to be forced (no Part 10 preamble)."""
    try:
        return dcmread(path, stop_before_pixels=True, defer_size=_DEFER_SIZE), False
    except InvalidDicomError:
        # A bare data set (no preamble, no "DICM"): some senders write these.
        return dcmread(path, stop_before_pixels=True, defer_size=_DEFER_SIZE, force=True), True


def _uid_or_none(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text if text and len(text) <= UID_MAX and text.isprintable() else None


def _identify_head(head: bytes) -> Dataset:
    """Best effort: the UIDs at the start of a part that could not be written."""
    try:
        return dcmread(BytesIO(head), stop_before_pixels=True, force=True)
    except Exception:
        return Dataset()


def _failed(
    index: int, reason: FailureReason, detail: str, ds: Dataset | None = None
) -> InstanceResult:
    ds = ds if ds is not None else Dataset()
    return InstanceResult(
        index=index,
        sop_class_uid=_uid_or_none(ds, "SOPClassUID"),
        sop_instance_uid=_uid_or_none(ds, "SOPInstanceUID"),
        study_uid=_uid_or_none(ds, "StudyInstanceUID"),
        series_uid=_uid_or_none(ds, "SeriesInstanceUID"),
        failure=reason,
        detail=detail,
    )


def _write_failure(exc: OSError) -> FailureReason:
    return (
        FailureReason.OUT_OF_RESOURCES
        if exc.errno in _OUT_OF_SPACE
        else FailureReason.PROCESSING_FAILURE
    )


def process_part(
    part: SpooledPart,
    store: InstanceStore,
    study_uid: str | None,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
) -> InstanceResult:
    """Validate one spooled part and store it (blocking: run it in a worker thread).

    Args:
        part: the part, as :func:`service.multipart.spool_multipart` left it.
        store: where accepted instances go.
        study_uid: the StudyInstanceUID of the request URL, if any.
        max_inflated_bytes: the most a deflated data set may inflate to.
    """
    index = part.index
    if part.error is not None or part.path is None:
        error = part.error or OSError(errno.EIO, "no spool file")
        return _failed(
            index,
            _write_failure(error),
            f"spooling failed: {errno.errorcode.get(error.errno or 0, 'error')}",
            _identify_head(part.head),
        )
    if not part.is_dicom:
        return _failed(
            index,
            FailureReason.CANNOT_UNDERSTAND,
            f"part media type {str(part.media_type)[:60]!r} is not application/dicom",
        )
    try:
        with part.path.open("rb") as fp:
            check_inflated_size(fp, max_inflated_bytes)
    except DeflateBombError as exc:
        return _failed(index, FailureReason.OUT_OF_RESOURCES, str(exc))
    except OSError as exc:
        return _failed(index, _write_failure(exc), f"spool file unreadable ({type(exc).__name__})")
    try:
        ds, forced = _read_header(part.path)
    except Exception as exc:
        return _failed(
            index, FailureReason.CANNOT_UNDERSTAND, f"not a DICOM file ({type(exc).__name__})"
        )
    try:
        ident = InstanceIdentity.from_dataset(ds)
    except Exception as exc:
        # A forced read of something that is not DICOM rarely finds any UID at all.
        reason = (
            FailureReason.CANNOT_UNDERSTAND
            if forced and _uid_or_none(ds, "SOPInstanceUID") is None
            else FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        )
        detail = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
        return _failed(index, reason, detail, ds)
    if study_uid is not None and ident.study_uid != study_uid:
        return _failed(
            index,
            FailureReason.STUDY_UID_MISMATCH,
            "the instance's StudyInstanceUID differs from the one in the URL",
            ds,
        )
    skip = None
    if not is_image_sop_class(ident.sop_class_uid):
        name = UID(ident.sop_class_uid).name
        skip = f"non-image SOP class ({name})"[:200]
    try:
        outcome = store.store(
            part.path, ds, sha256=part.sha256 or None, size=part.size, skip_reason=skip
        )
    except OSError as exc:
        return _failed(
            index,
            _write_failure(exc),
            f"storing failed: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}",
            ds,
        )
    except (SQLAlchemyError, ValueError) as exc:
        log.error("storing an instance failed: %s", type(exc).__name__)
        return _failed(index, FailureReason.PROCESSING_FAILURE, type(exc).__name__, ds)
    row = outcome.row
    warning = None if outcome.same_content else WarningReason.ELEMENTS_DISCARDED
    return InstanceResult(
        index=index,
        sop_class_uid=row.sop_class_uid,
        sop_instance_uid=row.sop_instance_uid,
        study_uid=row.study_uid,
        series_uid=row.series_uid,
        stored=True,
        created=outcome.created,
        warning=warning,
        skip_reason=row.skip_reason,
        detail=(
            "stored"
            if outcome.created
            else "already stored; its lost file put back"
            if outcome.restored
            else "already stored" + ("" if outcome.same_content else " with other bytes")
        ),
    )


def _process_all(
    parts: list[SpooledPart], store: InstanceStore, study_uid: str | None, max_inflated: int
) -> list[InstanceResult]:
    try:
        results = []
        for part in parts:
            results.append(process_part(part, store, study_uid, max_inflated))
            if len(results) < len(parts):
                failpoint("stow.mid_body")
        failpoint("stow.before_response")
        return results
    finally:
        remove_spooled(parts)


async def stow(
    chunks: AsyncIterable[bytes],
    content_type: str | None,
    store: InstanceStore,
    *,
    study_uid: str | None = None,
    limits: MultipartLimits | None = None,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
) -> StowResult:
    """Parse, validate and store a STOW-RS body; every accepted instance is durable on return.

    Args:
        chunks: the request body as it arrives.
        content_type: the request's Content-Type header.
        store: where instances go (its spool folder takes the parts).
        study_uid: the StudyInstanceUID of the URL, if any.
        limits: bounds on the body.
        max_inflated_bytes: the most a deflated data set may inflate to (a part beyond
            fails with A700, out of resources).

    Raises:
        UnsupportedMediaTypeError: (415) not ``multipart/related; type="application/dicom"``.
        BadRequestError: (400) no boundary, a malformed or unterminated body, no parts, or
            an invalid StudyInstanceUID in the URL.
        PayloadTooLargeError: (413) over ``limits``.
    """
    boundary = parse_related_content_type(content_type)
    if study_uid is not None and not is_valid_uid(study_uid):
        raise BadRequestError("the StudyInstanceUID in the URL is not a valid DICOM UID")
    parts = await spool_multipart(chunks, boundary, store.spool, limits)
    if not parts:
        raise BadRequestError("the multipart body holds no parts")
    results = await anyio.to_thread.run_sync(
        _process_all, parts, store, study_uid, max_inflated_bytes
    )
    first = next((r.study_uid for r in results if r.stored), None)
    result = StowResult(results, study_uid or first)
    new = sum(r.created for r in results)
    log.info(
        "stow: %d part(s), %d stored (%d new), %d failed",
        len(results),
        len(result.stored),
        new,
        len(result.failed),
        extra={
            "study": hash_uid(result.study_uid),
            "failures": sorted({f"{int(r.failure):04X}" for r in result.failed if r.failure}),
        },
    )
    for r in result.failed:
        log.info(
            "stow part %d failed (%04X): %s",
            r.index,
            int(r.failure or 0),
            r.detail,
            extra={"instance": hash_uid(r.sop_instance_uid)},
        )
    return result
