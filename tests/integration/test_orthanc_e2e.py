"""End to end with a real Orthanc: a radiograph stored in the PACS comes back with kgdx's SR.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started by the test on loopback ports,
see :mod:`tests.orthanc`) forwards each stable study to kgdx with its Lua ``OnStableStudy``
hook and ``POST /dicom-web/servers/kgdx/stow``; ``kgdx serve`` (a real process, see
:mod:`tests.kgdx_server`) stores it, runs the study job after ``KGDX_STABLE_SECONDS`` and
pushes a DICOM SR back to Orthanc's DICOMweb root by STOW-RS. The SR must appear in the
same study exactly once, although Orthanc re-forwards the study when the SR lands in it, and
also when kgdx is SIGKILLed right after it accepted the study and is restarted.

The harness tests (``TestHarness``) pin what Orthanc's STOW-RS client sends and how it reads
the answer, against a capture server standing in for kgdx; they need no kgdx and document
the wire format for the STOW-RS endpoint (``tests/integration/orthanc/NOTES.md``):

* ``POST <server Url>studies`` HTTP/1.1 with ``Transfer-Encoding: chunked`` (chunks of up
  to 65524 bytes, not aligned with the parts; ``"ChunkedTransfers": false`` gives a
  ``Content-Length`` instead), ``Content-Type: multipart/related; type="application/dicom";
  boundary=<uuid>-<uuid>`` (unquoted), ``Accept: application/dicom+json``, and the server
  entry's ``HttpHeaders`` (``Authorization: Bearer <key>``).
* Body: no preamble, each part ``--B\\r\\nContent-Type: application/dicom\\r\\n
  Content-Length: N\\r\\n\\r\\n<Part 10 file as stored>\\r\\n``, closed by ``--B--`` with
  no trailing CRLF.
* Success only with a 2xx JSON answer whose ``00081199`` lists as many items as instances
  sent and whose ``00081198`` / ``0008119A`` are empty or absent; otherwise the forward
  fails, is logged, and is never retried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any

import pydicom
import pytest

from tests.integration.conftest import (
    KGDX_STABLE_SECONDS,
    ORTHANC_STABLE_AGE,
    Captured,
    Pacs,
    StowCapture,
    real_radiograph,
    split_multipart,
    store_instances_response,
)
from tests.orthanc import OrthancServer, orthanc_server, wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

SR_MODALITY = "SR"
#: How long the SR may take: STOW accepted -> stable wait -> inference -> SR -> push.
SR_TIMEOUT_S = 120.0


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


# ---------------------------------------------------------------------------------------------
# The harness on its own: Orthanc, its Lua hook and its STOW-RS client, against a capture
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
class TestHarness:
    def test_orthanc_stores_and_answers_qido(self, orthanc_to_capture: OrthancServer) -> None:
        orthanc = orthanc_to_capture
        data, ds = real_radiograph()
        answer = orthanc.upload(data)
        assert answer["Status"] == "Success"
        assert orthanc.upload(data)["Status"] == "AlreadyStored"
        client = orthanc.dicomweb_client()  # dicomweb-client against Orthanc's QIDO-RS
        studies = client.search_for_studies(search_filters={"PatientID": ds.PatientID})
        assert [_value(s, "0020000D") for s in studies] == [ds.StudyInstanceUID]
        series = client.search_for_series(
            study_instance_uid=ds.StudyInstanceUID, search_filters={"Modality": "DX"}
        )
        assert [_value(s, "0020000E") for s in series] == [ds.SeriesInstanceUID]
        assert orthanc.search_sr(ds.StudyInstanceUID) == []
        assert orthanc.study_id(ds.StudyInstanceUID) == answer["ParentStudy"]

    def test_stable_study_is_forwarded_as_stow_rs(
        self, orthanc_to_capture: OrthancServer, stow_capture: StowCapture
    ) -> None:
        orthanc = orthanc_to_capture
        data, ds = real_radiograph()
        study_id = orthanc.upload(data)["ParentStudy"]
        [forward] = wait_for(lambda: orthanc.forwards(study_id), 30, what="the forward")
        assert forward.ok, orthanc.log_tail()
        [req] = stow_capture.for_study(ds.StudyInstanceUID)
        _assert_stow_request(req, [data])
        job = orthanc.stow_jobs()[-1]
        assert job["State"] == "Success"
        assert job["Content"]["InstancesCount"] == "1"

    def test_no_chunked_transfers_sends_a_content_length(
        self, orthanc_available: None, stow_capture: StowCapture
    ) -> None:
        with _orthanc(stow_capture, {"ChunkedTransfers": False}) as orthanc:
            data, ds = real_radiograph()
            study_id = orthanc.upload(data)["ParentStudy"]
            [forward] = wait_for(lambda: orthanc.forwards(study_id), 30, what="the forward")
        assert forward.ok
        [req] = stow_capture.for_study(ds.StudyInstanceUID)
        assert req.header("Transfer-Encoding") is None
        assert req.header("Content-Length") == str(len(req.body))
        assert req.chunks == []

    def test_study_that_changes_is_forwarded_again_whole(
        self, orthanc_to_capture: OrthancServer, stow_capture: StowCapture
    ) -> None:
        """What kgdx sees when its SR lands in the study: the study again, SR included."""
        orthanc = orthanc_to_capture
        first, ds = real_radiograph()
        study_id = orthanc.upload(first)["ParentStudy"]
        wait_for(lambda: orthanc.forwards(study_id), 30, what="the first forward")
        second, _ = real_radiograph(
            "second",
            study_uid=ds.StudyInstanceUID,
            patient_id=ds.PatientID,
            patient_name=str(ds.PatientName),
        )
        orthanc.upload(second)
        forwards = wait_for(
            lambda: len(orthanc.forwards(study_id)) >= 2 and orthanc.forwards(study_id),
            30,
            what="the second forward",
        )
        assert [f.ok for f in forwards] == [True, True]
        requests = stow_capture.for_study(ds.StudyInstanceUID)
        assert len(requests) == 2
        _assert_stow_request(requests[1], [first, second], any_order=True)

    def test_a_bad_answer_fails_the_forward_and_is_never_retried(
        self, orthanc_to_capture: OrthancServer, stow_capture: StowCapture
    ) -> None:
        """One study per kind of bad answer, forwarded side by side."""
        orthanc = orthanc_to_capture
        by_study = _answer_by_study(stow_capture)
        jobs_before = len(orthanc.stow_jobs())
        studies = {}
        for name, answer in BAD_ANSWERS.items():
            data, ds = real_radiograph()
            by_study[ds.StudyInstanceUID] = answer
            studies[name] = (ds.StudyInstanceUID, orthanc.upload(data)["ParentStudy"])
        wait_for(
            lambda: all(orthanc.forwards(sid) for _, sid in studies.values()),
            60,
            what="the forwards",
        )
        time.sleep(2 * 1 + 1)  # two stable ages and a margin: no retry, no second forward
        for name, (uid, sid) in studies.items():
            assert [f.ok for f in orthanc.forwards(sid)] == [False], name
            assert len(stow_capture.for_study(uid)) == 1, name
        jobs = orthanc.stow_jobs()[jobs_before:]
        assert [j["State"] for j in jobs] == ["Failure"] * len(BAD_ANSWERS)

    def test_a_full_referenced_sequence_is_success(
        self, orthanc_to_capture: OrthancServer, stow_capture: StowCapture
    ) -> None:
        """200 or 202, application/dicom+json or application/json, with an empty
        00081198 and a RetrieveURL: all count as stored."""
        orthanc = orthanc_to_capture
        by_study = _answer_by_study(stow_capture)

        def answer(status: int, ctype: str) -> Callable[[Captured], tuple[int, str, bytes]]:
            def respond(req: Captured) -> tuple[int, str, bytes]:
                body = json.loads(store_instances_response(req)[2])
                body["00081198"] = {"vr": "SQ"}  # present but empty: fine
                body["00081190"] = {"vr": "UR", "Value": ["http://127.0.0.1/dicomweb/studies/1"]}
                return status, ctype, json.dumps(body).encode()

            return respond

        studies = []
        for status in (200, 202):
            for ctype in ("application/dicom+json", "application/json"):
                data, ds = real_radiograph()
                by_study[ds.StudyInstanceUID] = answer(status, ctype)
                studies.append(orthanc.upload(data)["ParentStudy"])
        wait_for(lambda: all(orthanc.forwards(s) for s in studies), 60, what="the forwards")
        for sid in studies:
            assert [f.ok for f in orthanc.forwards(sid)] == [True], orthanc.log_tail()


def _answer_by_study(
    capture: StowCapture,
) -> dict[str, Callable[[Captured], tuple[int, str, bytes]]]:
    """Make ``capture`` answer each request by the study it carries; fill the dict."""
    table: dict[str, Callable[[Captured], tuple[int, str, bytes]]] = {}

    def respond(req: Captured) -> tuple[int, str, bytes]:
        for uid in req.study_uids():
            if uid in table:
                return table[uid](req)
        return store_instances_response(req)

    capture.responder = respond
    return table


def _ref_answer(req: Captured, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    body = json.loads(store_instances_response(req)[2])
    mutate(body)
    return json.dumps(body).encode()


BAD_ANSWERS: dict[str, Callable[[Captured], tuple[int, str, bytes]]] = {
    "503": lambda r: (503, "application/json", b'{"error": "busy"}'),
    "not-json": lambda r: (200, "text/plain", b"stored"),
    "no-00081199": lambda r: (200, "application/dicom+json", b"{}"),
    "fewer-items": lambda r: (200, "application/dicom+json", b'{"00081199": {"vr": "SQ"}}'),
    "failed-sop": lambda r: (
        202,
        "application/dicom+json",
        _ref_answer(r, lambda b: b.update({"00081198": {"vr": "SQ", "Value": [{}]}})),
    ),
    "other-failures": lambda r: (
        202,
        "application/dicom+json",
        _ref_answer(r, lambda b: b.update({"0008119A": {"vr": "SQ", "Value": [{}]}})),
    ),
}


def _orthanc(capture: StowCapture, extra: dict[str, Any] | None = None) -> Any:
    return orthanc_server(
        server_url=capture.url,
        server_headers={"Authorization": "Bearer kgdx_test_key"},
        stable_age=1,
        extra_server=extra,
    )


def _assert_stow_request(req: Captured, sent: list[bytes], any_order: bool = False) -> None:
    """``req`` is the STOW-RS request Orthanc's client makes, carrying exactly ``sent``."""
    assert (req.method, req.path, req.version) == ("POST", "/dicomweb/studies", "HTTP/1.1")
    assert req.header("Authorization") == "Bearer kgdx_test_key"
    assert req.header("Accept") == "application/dicom+json"
    assert req.header("Expect") is None
    ctype = req.header("Content-Type") or ""
    prefix = 'multipart/related; type="application/dicom"; boundary='
    assert ctype.startswith(prefix), ctype
    boundary = ctype[len(prefix) :]
    assert '"' not in boundary and len(boundary) == 73  # <uuid>-<uuid>, unquoted
    assert req.header("Transfer-Encoding") == "chunked"
    assert req.header("Content-Length") is None
    assert sum(req.chunks) == len(req.body) and max(req.chunks) <= 65524
    assert req.body.startswith(b"--" + boundary.encode() + b"\r\n")  # no preamble
    assert req.body.endswith(b"\r\n--" + boundary.encode() + b"--")  # no CRLF after
    preamble, parts, epilogue = split_multipart(req.body, boundary)
    assert preamble == b"" and epilogue == b""
    contents = []
    for head, content in parts:
        lines = head.decode().split("\r\n")
        assert lines == ["Content-Type: application/dicom", f"Content-Length: {len(content)}"]
        contents.append(content)
        ds = pydicom.dcmread(BytesIO(content))
        assert ds.file_meta.TransferSyntaxUID
    if any_order:
        assert sorted(contents) == sorted(sent)
    else:
        assert contents == sent  # byte for byte as uploaded


# ---------------------------------------------------------------------------------------------
# Orthanc <-> kgdx, end to end
# ---------------------------------------------------------------------------------------------

#: After the SR landed: Orthanc waits StableAge, re-forwards the study (DX + SR), kgdx waits
#: KGDX_STABLE_SECONDS, and would process it again if it were going to; this long covers a
#: whole second cycle with a margin.
SECOND_CYCLE_S = 2 * ORTHANC_STABLE_AGE + KGDX_STABLE_SECONDS + 8


def _sr_instances(pacs: Pacs, study_uid: str) -> list[dict[str, Any]]:
    """The study's SR instances in Orthanc, by QIDO-RS (dicomweb-client)."""
    return pacs.orthanc.search_sr(study_uid)


def _wait_sr(pacs: Pacs, study_uid: str) -> list[dict[str, Any]]:
    try:
        srs: list[dict[str, Any]] = wait_for(
            lambda: _sr_instances(pacs, study_uid),
            SR_TIMEOUT_S,
            interval=0.5,
            what="kgdx's SR in Orthanc",
        )
    except TimeoutError as exc:
        status = pacs.study_status(study_uid)
        pytest.fail(f"{exc}; kgdx study status: {json.dumps(status)[:2000]}\n{pacs.diagnostics()}")
    return srs


def _assert_exactly_one_sr_after_reforward(
    pacs: Pacs, study_uid: str, study_id: str, source: Any
) -> Any:
    """The SR is there once; Orthanc re-forwards the study with it; after a whole second
    cycle there is still one SR, one push, one job. Returns the SR (pydicom)."""
    orthanc = pacs.orthanc
    [sr] = _wait_sr(pacs, study_uid)
    n_forwards = len(orthanc.forwards(study_id))
    # The SR made the study change: Orthanc forwards it again (DX + SR) once it settles.
    forwards = wait_for(
        lambda: len(orthanc.forwards(study_id)) > n_forwards and orthanc.forwards(study_id),
        4 * ORTHANC_STABLE_AGE + 20,
        what="Orthanc's re-forward after the SR landed",
    )
    # kgdx must accept the re-forward (every instance in 00081199), or Orthanc logs a failure.
    assert forwards[-1].ok, pacs.diagnostics()
    time.sleep(SECOND_CYCLE_S)
    status = wait_for(
        lambda: (s := pacs.study_status(study_uid)) and s["status"] == "done" and s,
        SR_TIMEOUT_S,
        what="the study to settle as done",
    )
    srs = _sr_instances(pacs, study_uid)
    assert len(srs) == 1, (srs, pacs.diagnostics())
    assert _value(srs[0], "00080018") == _value(sr, "00080018")
    # Orthanc's own records agree: one SR instance in the study, and it was pushed once.
    assert len(orthanc.study_instances(study_uid)) == 2  # the radiograph and the SR
    pushes = orthanc.stow_received()
    assert len(pushes) == 1, pushes
    # kgdx's view: one job, done, one SR built and pushed.
    assert [j["state"] for j in status["jobs"]] == ["done"], status["jobs"]
    assert status["sr"]["built"] == 1 and status["sr"]["pushed"] == 1, status["sr"]
    # The SR itself, fetched by WADO-RS through dicomweb-client, sits in the same study.
    client = orthanc.dicomweb_client()
    sr_ds = client.retrieve_instance(study_uid, _value(sr, "0020000E"), _value(sr, "00080018"))
    assert sr_ds.Modality == SR_MODALITY
    assert sr_ds.StudyInstanceUID == source.StudyInstanceUID
    assert sr_ds.PatientID == source.PatientID
    assert str(sr_ds.PatientName) == str(source.PatientName)
    assert sr_ds.AccessionNumber == source.AccessionNumber
    assert sr_ds.SeriesInstanceUID != source.SeriesInstanceUID
    referenced = {
        str(sop.ReferencedSOPInstanceUID)
        for ev in sr_ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in ev.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert source.SOPInstanceUID in referenced
    return sr_ds


@pytest.mark.timeout(600)
def test_sr_lands_in_the_study_exactly_once(make_pacs: Callable[..., Pacs]) -> None:
    pacs = make_pacs(KGDX_STABLE_SECONDS="1")
    data, ds = real_radiograph()
    t0 = time.monotonic()
    study_id = pacs.orthanc.upload(data)["ParentStudy"]
    [forward] = wait_for(
        lambda: pacs.orthanc.forwards(study_id), 30, what="Orthanc's forward to kgdx"
    )
    assert forward.ok, pacs.diagnostics()  # kgdx's STOW answer satisfied Orthanc
    status = pacs.study_status(ds.StudyInstanceUID)
    assert status is not None and status["instances_received"] == 1
    _wait_sr(pacs, ds.StudyInstanceUID)
    print(f"upload -> SR in Orthanc: {time.monotonic() - t0:.1f}s")
    _assert_exactly_one_sr_after_reforward(pacs, ds.StudyInstanceUID, study_id, ds)


@pytest.mark.timeout(600)
def test_sr_arrives_once_after_kgdx_is_killed_having_accepted_the_study(
    make_pacs: Callable[..., Pacs],
) -> None:
    """SIGKILL in the window between the STOW answer and the job (KGDX_STABLE_SECONDS)."""
    pacs = make_pacs()
    data, ds = real_radiograph()
    study_id = pacs.orthanc.upload(data)["ParentStudy"]
    # Accepted: Orthanc got kgdx's answer and kgdx lists the study. Then kill at once.
    wait_for(lambda: pacs.orthanc.forwards(study_id), 30, interval=0.02, what="the forward")
    status = wait_for(
        lambda: pacs.study_status(ds.StudyInstanceUID),
        10,
        interval=0.02,
        what="kgdx to list the study",
    )
    pacs.kgdx.kill()
    assert pacs.orthanc.forwards(study_id)[0].ok, pacs.diagnostics()
    assert status["status"] == "received", (
        f"the job started before the kill ({status['status']}); raise KGDX_STABLE_SECONDS"
    )
    assert status["instances_received"] == 1
    assert _sr_instances(pacs, ds.StudyInstanceUID) == []
    pacs.kgdx.restart()  # same KGDX_HOME, same port: nothing re-sent by Orthanc
    _assert_exactly_one_sr_after_reforward(pacs, ds.StudyInstanceUID, study_id, ds)
    assert len(pacs.orthanc.forwards(study_id)) == 2  # the first, and the SR's re-forward
