"""Results pushed over DIMSE C-STORE to a PACS without DICOMweb: a real DCMTK storescp receives
the SR and the capture of a study sent to our STOW-RS; a receiver that is down at first is
retried until it is up."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from app.dicom.multipart import build_related
from app.results.delivery import parse_dimse_destination
from tests.conftest import bone_phantom
from tests.dicom_factory import make_dataset, to_bytes
from tests.live import ServiceProcess, free_port, wait_for


def storescp(port: int, out: Path) -> subprocess.Popen:
    binary = shutil.which("storescp")
    if binary is None:
        pytest.skip("DCMTK's storescp is not installed (Debian package dcmtk)")
    out.mkdir(parents=True, exist_ok=True)
    # -aet: its AE title; +xa: any transfer syntax; -od: one file per object received
    return subprocess.Popen(
        [binary, "-aet", "PACS", "+xa", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_dimse_destination_syntax():
    assert parse_dimse_destination("PACS@10.0.0.5:104") == ("PACS", "10.0.0.5", 104)
    for bad in ("PACS", "@h:1", "PACS@h", "PACS@:104", "A" * 17 + "@h:104"):
        with pytest.raises(ValueError):
            parse_dimse_destination(bad)


def test_results_reach_a_dimse_pacs_once_it_listens(tmp_path: Path):
    pacs_port = free_port()
    service = ServiceProcess(
        free_port(),
        FRACTURE_DIMSE_DESTINATION=f"PACS@127.0.0.1:{pacs_port}",
        FRACTURE_DELIVERY_RETRY_S="0.5",
        FRACTURE_DELIVERY_MAX_BACKOFF_S="1",
    )
    receiver = None
    try:
        ds = make_dataset(bone_phantom(200, 160).astype(np.uint16) * 8, bits_stored=12)
        body, ctype = build_related([to_bytes(ds)])
        r = service.http.post("/dicomweb/studies", content=body, headers={"content-type": ctype})
        assert r.status_code == 200
        findings = f"/dicomweb/studies/{ds.StudyInstanceUID}/findings"
        state = wait_for(
            lambda: (f := service.http.get(findings).json()["delivery"])["attempts"] >= 1 and f,
            30,
            "a failed C-STORE attempt",
        )
        assert state["delivered"] is False and "association" in state["last_error"]

        receiver = storescp(pacs_port, tmp_path / "received")
        wait_for(lambda: service.http.get(findings).json()["delivery"]["delivered"], 60, "C-STORE")
        files = sorted((tmp_path / "received").iterdir())
        objects = [pydicom.dcmread(f) for f in files]
        assert sorted(o.SOPClassUID.name for o in objects) == [
            "Comprehensive SR Storage",
            "Secondary Capture Image Storage",
        ]
        assert all(o.StudyInstanceUID == ds.StudyInstanceUID for o in objects)
        assert all(o.PatientID == ds.PatientID for o in objects)
    finally:
        service.stop()
        if receiver is not None:
            receiver.terminate()
            receiver.wait(timeout=10)
