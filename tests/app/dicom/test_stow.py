"""STOW-RS through the real app: status codes, the Store Instances Response, result objects."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from app.dicom.multipart import build_related, media_params, parse_related
from tests.app.dicom.sr_checks import assert_provenance, assert_regions_match
from tests.conftest import bone_phantom
from tests.dicom_factory import make_dataset, to_bytes

FAILED, REFERENCED, REASON, SOP_UID = "00081198", "00081199", "00081197", "00081155"


def instance(study_uid: str, **kwargs) -> tuple[pydicom.Dataset, bytes]:
    ds = make_dataset(
        bone_phantom(160, 128).astype(np.uint16) * 8, bits_stored=12, study_uid=study_uid, **kwargs
    )
    return ds, to_bytes(ds)


def stow(
    client, payloads: list[bytes], study: str | None = None, accept: str = "application/dicom+json"
):
    body, ctype = build_related(payloads)
    url = "/dicomweb/studies" + (f"/{study}" if study else "")
    return client.post(url, content=body, headers={"content-type": ctype, "accept": accept})


def sop_uids(response_json: dict, key: str) -> list[str]:
    # An unparseable part has no UIDs: its item carries the attribute without a value.
    return [
        item[SOP_UID].get("Value", [""])[0] for item in response_json.get(key, {}).get("Value", [])
    ]


def test_multipart_round_trip():
    body, ctype = build_related([b"\x00\x01DICM", b"second\r\n--not-a-boundary"])
    media, params = media_params(ctype)
    assert media == "multipart/related" and params["type"] == "application/dicom"
    parts = parse_related(body, params["boundary"])
    assert [p.body for p in parts] == [b"\x00\x01DICM", b"second\r\n--not-a-boundary"]


def test_several_instances_of_one_study_are_stored_and_analysed(app_client):
    study = generate_uid()
    sources = [instance(study) for _ in range(3)]
    r = stow(app_client, [b for _, b in sources], study)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    body = r.json()
    assert sorted(sop_uids(body, REFERENCED)) == sorted(ds.SOPInstanceUID for ds, _ in sources)
    assert FAILED not in body
    assert body["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")
    assert "findings" in r.headers["link"]

    # Our result objects: one SR for the study, one secondary capture per image.
    wado = app_client.get(f"/dicomweb/studies/{study}")
    assert wado.status_code == 200
    parts = parse_related(wado.content, media_params(wado.headers["content-type"])[1]["boundary"])
    objects = [pydicom.dcmread(io.BytesIO(p.body)) for p in parts]
    kinds = [o.SOPClassUID.name for o in objects]
    assert (
        kinds.count("Comprehensive SR Storage") == 1
        and kinds.count("Secondary Capture Image Storage") == 3
    )
    for o in objects:
        assert o.StudyInstanceUID == study
        assert o.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds, _ in sources}
    sr = next(o for o in objects if o.Modality == "SR")
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study_ref in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_ref.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds, _ in sources}
    assert len(report.content.get_image_measurement_groups()) == 3
    findings = app_client.get(f"/dicomweb/studies/{study}/findings").json()
    assert (
        findings["study"]["images"] == 3 and findings["delivery"]["destination_configured"] is False
    )


def test_study_uid_mismatch_is_409(app_client):
    _, data = instance(generate_uid())
    r = stow(app_client, [data], generate_uid())
    assert r.status_code == 409
    failed = r.json()[FAILED]["Value"]
    assert failed[0][REASON]["Value"] == [0xA900]
    assert REFERENCED not in r.json()


def test_unsupported_modality_is_409_with_its_reason(app_client):
    study = generate_uid()
    _, data = instance(study, modality="MG")
    r = stow(app_client, [data], study)
    assert r.status_code == 409 and r.json()[FAILED]["Value"][0][REASON]["Value"] == [0x0122]


def test_a_chest_film_is_refused_as_out_of_scope_beside_a_wrist(app_client):
    """BodyPartExamined CHEST: not what the models were made for, refused with 0x0122 while the
    wrist of the same study is analysed (202)."""
    study = generate_uid()
    chest_ds, _ = instance(study)
    chest_ds.BodyPartExamined = "CHEST"
    wrist_ds, _ = instance(study)
    wrist_ds.BodyPartExamined = "WRIST"
    r = stow(app_client, [to_bytes(chest_ds), to_bytes(wrist_ds)], study)
    assert r.status_code == 202, r.text
    failed = r.json()[FAILED]["Value"]
    assert len(failed) == 1 and failed[0][REASON]["Value"] == [0x0122]
    assert sop_uids(r.json(), REFERENCED) == [wrist_ds.SOPInstanceUID]


def test_a_broken_instance_among_good_ones_is_202_with_its_reason(app_client):
    study = generate_uid()
    good_ds, good = instance(study)
    broken_ds = make_dataset(
        bone_phantom(160, 128).astype(np.uint16), bits_stored=12, study_uid=study
    )
    broken_ds.PixelData = broken_ds.PixelData[:64]  # truncated pixel data
    r = stow(app_client, [good, to_bytes(broken_ds), b"not dicom at all"], study)
    assert r.status_code == 202
    body = r.json()
    assert sop_uids(body, REFERENCED) == [good_ds.SOPInstanceUID]
    reasons = [item[REASON]["Value"][0] for item in body[FAILED]["Value"]]
    assert reasons == [0xC000, 0xC000]
    assert sop_uids(body, FAILED) == [broken_ds.SOPInstanceUID, ""]


def test_json_findings_by_content_negotiation(app_client):
    study = generate_uid()
    _, data = instance(study)
    r = stow(app_client, [data], study, accept="application/json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    answer = r.json()["studies"][0]
    assert (
        answer["study"]["study_instance_uid"] == study
        and 0 <= answer["study"]["fracture_probability"] <= 1
    )


def test_stow_client_errors(app_client):
    r = app_client.post(
        "/dicomweb/studies", content=b"x", headers={"content-type": "application/dicom"}
    )
    assert r.status_code == 415
    r = app_client.post(
        "/dicomweb/studies",
        content=b"no boundary here",
        headers={"content-type": 'multipart/related; type="application/dicom"; boundary=abc'},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_multipart"
    r = app_client.post(
        "/dicomweb/studies/not-a-uid", content=b"", headers={"content-type": "multipart/related"}
    )
    assert r.status_code == 422
    assert app_client.get(f"/dicomweb/studies/{generate_uid()}").status_code == 404


def test_sr_regions_are_the_json_boxes(app_client, dicom_dir):
    """At a low threshold the detector returns boxes: each is a closed SCOORD polyline on the
    source instance in the SR, with the same score."""
    data = (dicom_dir / "RG2_JPLY_fixed.dcm").read_bytes()
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    body, ctype = build_related([data])
    r = app_client.post(
        "/dicomweb/studies?score_threshold=0.001",
        content=body,
        headers={"content-type": ctype, "accept": "application/json"},
    )
    assert r.status_code == 200
    detections = r.json()["studies"][0]["images"][0]["detections"]
    assert detections, "expected boxes at a 0.001 threshold"
    wado = app_client.get(f"/dicomweb/studies/{source.StudyInstanceUID}")
    parts = parse_related(wado.content, media_params(wado.headers["content-type"])[1]["boundary"])
    sr = next(o for o in (pydicom.dcmread(io.BytesIO(p.body)) for p in parts) if o.Modality == "SR")
    assert_regions_match(sr, detections, source.SOPInstanceUID)
    assert_provenance(sr, r.json()["studies"][0]["models"])


def test_links_never_reflect_the_host_header(app_client):
    """A forged Host header must not end up in RetrieveURL, Link or the stored findings."""
    study = generate_uid()
    _, payload = instance(study)
    body, ctype = build_related([payload])
    r = app_client.post(
        "/dicomweb/studies",
        content=body,
        headers={"content-type": ctype, "host": "evil.example", "accept": "application/dicom+json"},
    )
    assert r.status_code == 200
    assert "evil.example" not in r.text and "evil.example" not in r.headers.get("link", "")
    retrieve = r.json()["00081190"]["Value"][0]
    assert retrieve.startswith("http://") and retrieve.endswith(f"/dicomweb/studies/{study}")
    findings = app_client.get(f"/dicomweb/studies/{study}/findings").json()
    assert findings["results_url"] == f"/dicomweb/studies/{study}"


def test_multipart_follows_rfc_2046():
    """A payload holding '--boundary' without the CRLF before it is not cut; quoted parameters
    may hold ';'; a body without its closing delimiter is refused."""
    from app.dicom.multipart import MultipartError

    boundary = "b0undary"
    payload = b"DICM...--b0undary inside the payload"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    parts = parse_related(body, boundary)
    assert [p.body for p in parts] == [payload]
    media, params = media_params('multipart/related; type="application/dicom; x=1"; boundary=q')
    assert media == "multipart/related" and params["type"] == "application/dicom; x=1"
    assert params["boundary"] == "q"
    import pytest

    with pytest.raises(MultipartError):
        parse_related(body[: -len(f"--{boundary}--\r\n") - 2], boundary)


def test_too_many_stow_parts_is_413(app_client):
    body, ctype = build_related([b"x"] * 40)
    r = app_client.post("/dicomweb/studies", content=body, headers={"content-type": ctype})
    assert r.status_code == 413 and r.json()["error"] == "too_many_images"
