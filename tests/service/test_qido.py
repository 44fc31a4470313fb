"""QIDO-RS ``GET /dicomweb/studies``, and dicomweb-client as the client of both transactions.

dicomweb-client talks HTTP through ``requests``, so it gets a real uvicorn server on a
loopback port (:func:`tests.service.test_stow.live_server`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dicomweb_client import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from requests.exceptions import HTTPError

from tests.service import images
from tests.service.test_stow import (
    DX,
    Service,
    assert_error,
    dx,
    kgdx_app,
    live_server,
    multipart,
    post,
)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with (
        kgdx_app(tmp_path_factory.mktemp("qido-home")) as service,
        TestClient(service.app, raise_server_exceptions=False) as client,
    ):
        service.client = client
        yield service


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with live_server(tmp_path_factory.mktemp("qido-live")) as service:
        yield service


def client_for(live: Service, scope: str = "ingest", **kwargs: Any) -> DICOMwebClient:
    return DICOMwebClient(f"{live.url}/dicomweb", headers=live.auth(scope), **kwargs)


def search(svc: Service, scope: str | None = "ingest", **params: Any) -> Any:
    assert svc.client is not None
    return svc.client.get(
        "/dicomweb/studies", params=params, headers=svc.auth(scope) if scope else {}
    )


def uid_of(study: dict[str, Any]) -> str:
    uid: str = study["0020000D"]["Value"][0]
    return uid


# -- dicomweb-client against a live server ------------------------------------------------------


def test_dicomweb_client_stores_then_lists_studies(live: Service) -> None:
    first, second = generate_uid(), generate_uid()
    datasets = [dx(first), dx(first, modality="CR"), dx(second)]
    # A small chunk size makes requests send the body with chunked transfer encoding.
    client = client_for(live, chunk_size=4096)
    answer = client.store_instances(datasets[:2])
    assert isinstance(answer, Dataset)
    refs = answer.ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [d.SOPInstanceUID for d in datasets[:2]]
    assert refs[0].ReferencedSOPClassUID == DX
    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL.endswith(f"/dicomweb/studies/{first}")
    answer = client.store_instances(datasets[2:], study_instance_uid=second)
    assert len(answer.ReferencedSOPSequence) == 1

    studies = client.search_for_studies()
    assert [uid_of(s) for s in studies] == [first, second]
    assert studies[0]["00080061"] == {"vr": "CS", "Value": ["CR", "DX"]}
    assert studies[0]["00201208"] == {"vr": "IS", "Value": [2]}
    only = client.search_for_studies(search_filters={"StudyInstanceUID": second})
    assert [uid_of(s) for s in only] == [second]
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "CR"}) == [studies[0]]
    assert client.search_for_studies(search_filters={"StudyInstanceUID": "1.2.3.4"}) == []
    paged = client.search_for_studies(limit=1, offset=1)
    assert [uid_of(s) for s in paged] == [second]
    everything = client.search_for_studies(limit=1, get_remaining=True)
    assert [uid_of(s) for s in everything] == [first, second]


def test_dicomweb_client_sees_failures_and_auth_errors(live: Service) -> None:
    study, other = generate_uid(), generate_uid()
    client = client_for(live)
    with pytest.raises(HTTPError) as caught:  # nothing stored: 409
        client.store_instances([dx(other)], study_instance_uid=study)
    assert caught.value.response is not None and caught.value.response.status_code == 409
    with pytest.raises(HTTPError) as caught:
        client_for(live, scope="predict").search_for_studies()
    assert caught.value.response is not None and caught.value.response.status_code == 403


# -- the search itself -------------------------------------------------------------------------


def test_study_results_and_media_type(svc: Service) -> None:
    study = generate_uid()
    sr_bytes = images.no_pixel_dicom_bytes()
    assert post(svc, multipart(dx(study), dx(study))).status_code == 200
    assert post(svc, multipart(sr_bytes)).status_code == 200
    r = search(svc, StudyInstanceUID=study)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/dicom+json"
    assert "warning" not in r.headers
    assert r.json() == [
        {
            "0020000D": {"vr": "UI", "Value": [study]},
            "00080061": {"vr": "CS", "Value": ["DX"]},
            "00201208": {"vr": "IS", "Value": [2]},
        }
    ]
    # The SR's study is listed too, with its modality; tags work as keys as well.
    everything = search(svc).json()
    sr_study = uid_of(everything[-1])
    r = search(svc, **{"0020000D": f"{study},{sr_study}", "includefield": "all"})
    assert [uid_of(s) for s in r.json()] == [study, sr_study]
    assert r.json()[1]["00080061"]["Value"] == ["SR"]


def test_no_match_is_204(svc: Service) -> None:
    r = search(svc, StudyInstanceUID="1.2.3.999999")
    assert r.status_code == 204 and r.content == b""


def test_unsupported_keys_are_ignored_with_a_warning(svc: Service) -> None:
    assert post(svc, multipart(dx())).status_code == 200
    r = search(svc, PatientID="PID-1", fuzzymatching="true")
    assert r.status_code == 200 and r.json()
    assert r.headers["warning"].startswith('299 kgdx "matching on PatientID')
    assert "fuzzymatching" not in r.headers["warning"]


def test_paging_parameters(svc: Service) -> None:
    for _ in range(3):
        assert post(svc, multipart(dx())).status_code == 200
    everything = search(svc).json()
    assert len(everything) >= 3
    assert search(svc, limit=2).json() == everything[:2]
    assert search(svc, limit=2, offset=1).json() == everything[1:3]
    assert search(svc, limit=100000).json() == everything  # clamped, not refused
    assert_error(search(svc, limit=0), 400, "limit must be at least 1")
    assert_error(search(svc, offset=-1), 400, "offset must be at least 0")
    assert_error(search(svc, limit="ten"), 400, "limit must be an integer")


def test_search_needs_the_ingest_scope(svc: Service) -> None:
    assert_error(search(svc, scope=None), 401, "API key")
    assert_error(search(svc, scope="predict"), 403, "ingest")
    assert search(svc, scope="admin").status_code in (200, 204)


def test_unsupported_keys_of_any_characters_are_named_safely(svc: Service) -> None:
    # Found by bench/fuzz_api.py: a key outside Latin-1 made the Warning header a 500.
    assert post(svc, multipart(dx())).status_code == 200
    r = search(svc, **{"กา": "x", 'Pa"t\x0cient': "y"})
    assert r.status_code == 200 and r.json()
    assert (
        r.headers["warning"]
        == '299 kgdx "matching on Pa?t?ient, ?? is not supported and was ignored"'
    )


def test_an_offset_beyond_64_bits_is_400(svc: Service) -> None:
    # Found by bench/fuzz_api.py: it overflowed the database's integer, a 500.
    big = "432755249935853355008"
    assert_error(search(svc, offset=big), 400, "offset must be at most")
    assert search(svc, offset=2**31 - 1).status_code == 204
    assert search(svc, limit=big).status_code in (200, 204)  # clamped, as any large limit
