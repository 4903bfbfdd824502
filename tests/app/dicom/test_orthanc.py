"""Against a real Orthanc (Debian's orthanc + orthanc-dicomweb), started here on loopback:
Orthanc sends a study to our STOW-RS endpoint through its DICOMweb client, the service pushes its
SR and secondary capture back, and we read them from Orthanc. Also: a destination that is down
at first loses nothing."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest

from tests.app.dicom.sr_checks import assert_provenance, assert_regions_match
from tests.conftest import DICOM_DIR, bone_phantom
from tests.dicom_factory import make_dataset, to_bytes
from tests.live import ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.slow
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    if path is None:
        pytest.skip(
            "Orthanc is not installed (make test installs Debian's orthanc and orthanc-dicomweb)"
        )
    plugin = next(
        (
            Path(d) / "libOrthancDicomWeb.so"
            for d in PLUGIN_DIRS
            if (Path(d) / "libOrthancDicomWeb.so").exists()
        ),
        None,
    )
    if plugin is None:
        pytest.skip(
            "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
        )
    return path


PACS_USER, PACS_PASSWORD = "fracture", "pacs-secret-1"
SERVICE_KEY = "service-key-for-orthanc"


class Orthanc:
    """A real Orthanc with authentication on (as in docker-compose): our service delivers to it
    with basic credentials, and it calls our STOW-RS with our API key."""

    def __init__(self, root: Path, http_port: int, service_url: str | None):
        binary = orthanc_binary()
        plugin = next(
            str(Path(d) / "libOrthancDicomWeb.so")
            for d in PLUGIN_DIRS
            if (Path(d) / "libOrthancDicomWeb.so").exists()
        )
        root.mkdir(parents=True, exist_ok=True)
        servers = (
            {
                "fracture": {
                    "Url": service_url,
                    "HttpHeaders": {"Authorization": f"Bearer {SERVICE_KEY}"},
                }
            }
            if service_url
            else {}
        )
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": http_port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {PACS_USER: PACS_PASSWORD},
            "HttpTimeout": 120,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers},
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            [binary, str(root / "orthanc.json")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}",
            timeout=120,
            auth=(PACS_USER, PACS_PASSWORD),
        )
        wait_for(lambda: self.http.get("/system").status_code == 200, 60, "Orthanc to start")
        assert httpx.get(f"http://127.0.0.1:{http_port}/system").status_code == 401

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_service(port: int, destination: str, **env: str) -> ServiceProcess:
    settings = {
        "FRACTURE_DICOMWEB_DESTINATION": destination,
        "FRACTURE_DICOMWEB_DESTINATION_USERNAME": PACS_USER,
        "FRACTURE_DICOMWEB_DESTINATION_PASSWORD": PACS_PASSWORD,
        "FRACTURE_API_KEYS": json.dumps([SERVICE_KEY]),
        "FRACTURE_DELIVERY_RETRY_S": "0.5",
        "FRACTURE_DELIVERY_MAX_BACKOFF_S": "1",
        **env,
    }
    service = ServiceProcess(port, **settings)
    service.http.headers["Authorization"] = f"Bearer {SERVICE_KEY}"
    return service


def source_dicom() -> bytes:
    shared = DICOM_DIR / "RG2_JPLY_fixed.dcm"
    if shared.exists():
        return shared.read_bytes()
    return to_bytes(make_dataset(bone_phantom(400, 320).astype(np.uint16) * 8, bits_stored=12))


def instances_of_study(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    found = orthanc.http.post("/tools/lookup", content=study_uid).json()
    if not found:
        return []
    ids = [i["ID"] for i in orthanc.http.get(f"/studies/{found[0]['ID']}/instances").json()]
    return [
        pydicom.dcmread(io.BytesIO(orthanc.http.get(f"/instances/{i}/file").content)) for i in ids
    ]


def test_orthanc_sends_a_study_and_gets_sr_and_capture_back(tmp_path):
    app_port, pacs_port = free_port(), free_port()
    pacs = Orthanc(tmp_path / "orthanc", pacs_port, f"http://127.0.0.1:{app_port}/dicomweb/")
    service = None
    try:
        service = start_service(app_port, f"http://127.0.0.1:{pacs_port}/dicom-web")
        data = source_dicom()
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        uploaded = pacs.http.post("/instances", content=data)
        assert uploaded.status_code == 200, uploaded.text
        study_id = uploaded.json()["ParentStudy"]
        sent = pacs.http.post(
            "/dicom-web/servers/fracture/stow", json={"Resources": [study_id], "Synchronous": True}
        )
        assert sent.status_code == 200, sent.text

        objects = wait_for(
            lambda: (
                [
                    o
                    for o in instances_of_study(pacs, source.StudyInstanceUID)
                    if o.SOPInstanceUID != source.SOPInstanceUID
                ]
                or None
                if len(instances_of_study(pacs, source.StudyInstanceUID)) >= 3
                else None
            ),
            90,
            "the SR and the capture to reach Orthanc",
        )
        by_kind = {o.SOPClassUID.name: o for o in objects}
        sr, sc = by_kind["Comprehensive SR Storage"], by_kind["Secondary Capture Image Storage"]
        for obj in (sr, sc):
            assert obj.StudyInstanceUID == source.StudyInstanceUID
            assert obj.SeriesInstanceUID != source.SeriesInstanceUID
            assert obj.PatientID == source.PatientID
            assert obj.Manufacturer == "Fracture Service Project"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.BurnedInAnnotation == "YES" and (sc.Rows, sc.Columns) == (
            source.Rows,
            source.Columns,
        )

        # The SR says what our JSON findings say: probability, operating point, boxes on the source.
        findings = service.http.get(f"/dicomweb/studies/{source.StudyInstanceUID}/findings").json()
        assert findings["delivery"]["delivered"] is True
        image = findings["images"][0]
        report = hd.sr.ComprehensiveSR.from_dataset(sr)
        group = report.content.get_image_measurement_groups()[0]
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Fracture probability"] == pytest.approx(
            image["fracture_probability"], abs=1e-4
        )
        assert values["Operating point false positives per image"] == pytest.approx(0.4)
        assert values["Detector score threshold"] == pytest.approx(
            findings["operating_point"]["detector_threshold"], abs=1e-4
        )
        assert_regions_match(sr, image["detections"], source.SOPInstanceUID)
        assert_provenance(sr, findings["models"])  # read back from the PACS
    finally:
        if service:
            service.stop()
        pacs.stop()


def stow_phantom(service: ServiceProcess) -> tuple[pydicom.Dataset, str]:
    """STOW one phantom study to the service; (its dataset, its findings path)."""
    from app.dicom.multipart import build_related

    ds = make_dataset(bone_phantom(200, 160).astype(np.uint16) * 8, bits_stored=12)
    body, ctype = build_related([to_bytes(ds)])
    r = service.http.post("/dicomweb/studies", content=body, headers={"content-type": ctype})
    assert r.status_code == 200
    return ds, f"/dicomweb/studies/{ds.StudyInstanceUID}/findings"


def test_results_wait_for_a_destination_that_is_down(tmp_path):
    app_port, pacs_port = free_port(), free_port()
    service = start_service(
        app_port, f"http://127.0.0.1:{pacs_port}/dicom-web"
    )  # nothing listens yet
    pacs = None
    try:
        ds, findings_url = stow_phantom(service)
        state = wait_for(
            lambda: (f := service.http.get(findings_url).json()["delivery"])["attempts"] >= 2 and f,
            30,
            "failed delivery attempts",
        )
        assert state["delivered"] is False and state["last_error"]
        assert (
            service.http.get(f"/dicomweb/studies/{ds.StudyInstanceUID}").status_code == 200
        )  # still here

        pacs = Orthanc(tmp_path / "orthanc", pacs_port, None)
        wait_for(
            lambda: service.http.get(findings_url).json()["delivery"]["delivered"],
            60,
            "the delivery",
        )
        kinds = sorted(o.SOPClassUID.name for o in instances_of_study(pacs, ds.StudyInstanceUID))
        assert kinds == ["Comprehensive SR Storage", "Secondary Capture Image Storage"]
    finally:
        service.stop()
        if pacs:
            pacs.stop()


class RestartableSetup:
    """A service on a state folder that outlives its processes, delivering to a PACS port where
    no PACS runs until start_pacs()."""

    def __init__(self, tmp_path: Path):
        self.root, self.app_port, self.pacs_port = tmp_path, free_port(), free_port()
        self.destination = f"http://127.0.0.1:{self.pacs_port}/dicom-web"
        self.state = tmp_path / "state"

    def start(self, **env: str):
        return start_service(
            self.app_port, self.destination, FRACTURE_STATE_DIR=str(self.state), **env
        )

    def start_pacs(self) -> Orthanc:
        return Orthanc(self.root / "orthanc", self.pacs_port, None)


def test_undelivered_results_survive_kill_9_and_reach_the_pacs_after_a_restart(tmp_path):
    """The PACS is down; a study is analysed twice (two results, neither replaces the other);
    the service is killed with SIGKILL. Restarted on the same state folder once the PACS is up,
    it delivers both results, and a further restart sends nothing again."""
    from app.dicom.multipart import build_related

    setup = RestartableSetup(tmp_path)
    service = setup.start()
    pacs = None
    try:
        ds = make_dataset(bone_phantom(200, 160).astype(np.uint16) * 8, bits_stored=12)
        body, ctype = build_related([to_bytes(ds)])
        for _ in range(2):
            r = service.http.post(
                "/dicomweb/studies", content=body, headers={"content-type": ctype}
            )
            assert r.status_code == 200
        findings_url = f"/dicomweb/studies/{ds.StudyInstanceUID}/findings"
        wait_for(
            lambda: service.http.get(findings_url).json()["delivery"]["attempts"] >= 1,
            30,
            "a failed delivery attempt",
        )
        service.kill()

        pacs = setup.start_pacs()
        service = setup.start()
        objects = wait_for(
            lambda: (
                found if len(found := instances_of_study(pacs, ds.StudyInstanceUID)) >= 4 else None
            ),
            60,
            "both results to reach the PACS",
        )
        kinds = sorted(o.SOPClassUID.name for o in objects)
        assert kinds == ["Comprehensive SR Storage"] * 2 + ["Secondary Capture Image Storage"] * 2
        assert service.http.get(findings_url).json()["delivery"]["delivered"] is True
        service.stop()
        service = setup.start()
        time.sleep(3)  # several retry periods
        assert len(instances_of_study(pacs, ds.StudyInstanceUID)) == 4
        text = service.http.get("/metrics").text
        assert "fracture_delivery_backlog 0.0" in text
    finally:
        service.stop()
        if pacs:
            pacs.stop()


def test_a_study_killed_mid_analysis_is_analysed_and_delivered_after_a_restart(tmp_path):
    """SIGKILL while a 12-instance STOW-RS request is being analysed: the instances were kept at
    acceptance, so the restarted service analyses them and the PACS gets the result."""
    import threading

    from app.dicom.multipart import build_related

    setup = RestartableSetup(tmp_path)
    service = setup.start()
    pacs = None
    try:
        study_uid = pydicom.uid.generate_uid()
        instances = [
            to_bytes(
                make_dataset(
                    bone_phantom(300 + 8 * i, 240).astype(np.uint16) * 8,
                    bits_stored=12,
                    study_uid=study_uid,
                )
            )
            for i in range(12)
        ]
        body, ctype = build_related(instances)

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):
                service.http.post(
                    "/dicomweb/studies", content=body, headers={"content-type": ctype}
                )

        sender = threading.Thread(target=send)
        sender.start()
        findings_url = f"/dicomweb/studies/{study_uid}/findings"
        database = setup.state / "results.db"

        def kept() -> int:  # instances the service holds in its intake (read-only look)
            with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
                return db.execute("SELECT count(*) FROM intake_objects").fetchone()[0]

        # polled tightly and killed at once: the analysis of 12 images takes seconds
        deadline = time.monotonic() + 30
        while not (database.exists() and kept() == 12):
            assert time.monotonic() < deadline, "the instances were never kept"
            time.sleep(0.01)
        service.kill()
        assert kept() == 12  # still there: not analysed when the process died
        sender.join(timeout=30)

        pacs = setup.start_pacs()
        service = setup.start()
        findings = wait_for(
            lambda: (r := service.http.get(findings_url)).status_code == 200 and r.json(),
            120,
            "the interrupted study to be analysed after the restart",
        )
        assert findings["study"]["images"] == 12
        kinds = wait_for(
            lambda: (
                k
                if len(k := [o.SOPClassUID.name for o in instances_of_study(pacs, study_uid)]) >= 13
                else None
            ),
            60,
            "the SR and 12 captures to reach the PACS",
        )
        assert kinds.count("Comprehensive SR Storage") == 1
    finally:
        service.stop()
        if pacs:
            pacs.stop()


def c_store(port: int, datasets: list) -> list[int]:
    """Send datasets in one association (pynetdicom as the SCU); each C-STORE status."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def phantom_study(n: int) -> list:
    study_uid = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds = make_dataset(
            bone_phantom(300 + 8 * i, 240).astype(np.uint16) * 8,
            bits_stored=12,
            study_uid=study_uid,
        )
        out.append(pydicom.dcmread(io.BytesIO(to_bytes(ds))))
    return out


def test_c_store_instances_acknowledged_survive_kill_9(tmp_path):
    """Six instances over C-STORE, each answered success; SIGKILL right after the association
    is released (before the analysis of six images can end). Restarted with the PACS up, the
    service analyses them and the PACS gets the SR: an acknowledged instance is never lost."""
    setup = RestartableSetup(tmp_path)
    dimse_port = free_port()
    service = setup.start(FRACTURE_DIMSE_PORT=str(dimse_port))
    pacs = None
    try:
        study = phantom_study(6)
        assert c_store(dimse_port, study) == [0x0000] * 6
        service.kill()
        database = setup.state / "results.db"
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            assert db.execute("SELECT count(*) FROM intake_objects").fetchone()[0] == 6

        pacs = setup.start_pacs()
        service = setup.start(FRACTURE_DIMSE_PORT=str(dimse_port))
        study_uid = study[0].StudyInstanceUID
        findings = wait_for(
            lambda: (
                (r := service.http.get(f"/dicomweb/studies/{study_uid}/findings")).status_code
                == 200
                and r.json()
            ),
            120,
            "the acknowledged C-STORE study to be analysed after the restart",
        )
        assert findings["study"]["images"] == 6
        kinds = wait_for(
            lambda: (
                k
                if len(k := [o.SOPClassUID.name for o in instances_of_study(pacs, study_uid)]) >= 7
                else None
            ),
            60,
            "the SR and 6 captures to reach the PACS",
        )
        assert kinds.count("Comprehensive SR Storage") == 1
    finally:
        service.stop()
        if pacs:
            pacs.stop()


def test_a_full_intake_answers_out_of_resources(tmp_path):
    """An intake bounded to 2 instances: the third of one association is answered 0xA700 (out of
    resources), not kept; STOW-RS answers 503 with Retry-After while the intake is full."""
    from app.dicom.multipart import build_related

    dimse_port = free_port()
    service = start_service(
        free_port(),
        "http://127.0.0.1:9/dicom-web",
        FRACTURE_DIMSE_PORT=str(dimse_port),
        FRACTURE_MAX_INTAKE_INSTANCES="2",
    )
    try:
        study = phantom_study(3)
        assert c_store(dimse_port, study) == [0x0000, 0x0000, 0xA700]
        one = make_dataset(bone_phantom(200, 160).astype(np.uint16) * 8, bits_stored=12)
        body, ctype = build_related([to_bytes(one)] * 3)
        r = service.http.post("/dicomweb/studies", content=body, headers={"content-type": ctype})
        assert r.status_code == 503 and r.json()["error"] == "intake_full"
        assert int(r.headers["retry-after"]) > 0
        findings = wait_for(
            lambda: (
                (
                    r := service.http.get(f"/dicomweb/studies/{study[0].StudyInstanceUID}/findings")
                ).status_code
                == 200
                and r.json()
            ),
            60,
            "the two accepted instances to be analysed",
        )
        assert findings["study"]["images"] == 2
    finally:
        service.stop()


def test_a_destination_that_refuses_for_good_is_not_retried(tmp_path):
    """Wrong PACS credentials: 401 is permanent, so the result is kept here, marked given up,
    and not sent again and again."""
    app_port, pacs_port = free_port(), free_port()
    pacs = Orthanc(tmp_path / "orthanc", pacs_port, None)
    service = start_service(
        app_port,
        f"http://127.0.0.1:{pacs_port}/dicom-web",
        FRACTURE_DICOMWEB_DESTINATION_PASSWORD="wrong",
    )
    try:
        ds, findings_url = stow_phantom(service)
        state = wait_for(
            lambda: (f := service.http.get(findings_url).json()["delivery"])["given_up"] and f,
            30,
            "the delivery to be given up",
        )
        assert state["attempts"] == 1 and "401" in state["last_error"]
        time.sleep(2)  # several retry periods: no further attempt
        assert service.http.get(findings_url).json()["delivery"]["attempts"] == 1
    finally:
        service.stop()
        pacs.stop()


def test_storescu_sends_over_dimse(tmp_path):
    """DCMTK's storescu sends a study over C-STORE; the results appear as after STOW-RS."""
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("DCMTK's storescu is not installed (Debian package dcmtk)")
    app_port, dimse_port = free_port(), free_port()
    service = start_service(
        app_port, "http://127.0.0.1:9/dicom-web", FRACTURE_DIMSE_PORT=str(dimse_port)
    )
    try:
        files = []
        study = None
        for i in range(2):
            ds = make_dataset(
                bone_phantom(200, 160).astype(np.uint16) * 8, bits_stored=12, study_uid=study
            )
            study = ds.StudyInstanceUID
            path = tmp_path / f"{i}.dcm"
            path.write_bytes(to_bytes(ds))
            files.append(str(path))
        mammo = make_dataset(
            bone_phantom(64, 64).astype(np.uint16), bits_stored=12, modality="MG", study_uid=study
        )
        (tmp_path / "mg.dcm").write_bytes(to_bytes(mammo))
        sent = subprocess.run(
            [storescu, "-aec", "FRACTURE", "127.0.0.1", str(dimse_port), *files],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        findings = wait_for(
            lambda: (
                (r := service.http.get(f"/dicomweb/studies/{study}/findings")).status_code == 200
                and r.json()
            ),
            60,
            "the C-STORE study to be analysed",
        )
        assert findings["study"]["images"] == 2
        # An instance the service refuses gets a failure status, not a silent success.
        refused = subprocess.run(
            [
                storescu,
                "-v",
                "-aec",
                "FRACTURE",
                "127.0.0.1",
                str(dimse_port),
                str(tmp_path / "mg.dcm"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
        assert "Refused: SOPClassNotSupported" in refused.stdout + refused.stderr  # status 0x0122
        # An association addressed to another AE title is rejected outright.
        wrong = subprocess.run(
            [storescu, "-aec", "NOT-US", "127.0.0.1", str(dimse_port), str(files[0])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wrong.returncode != 0
        assert "Association Rejected" in wrong.stdout + wrong.stderr
    finally:
        service.stop()
