"""The results database on real engines: SQLite (the default) and a real PostgreSQL server
started here on loopback (skipped, with the reason, where its binaries cannot run)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.inference.answers import StoredStudyAnswer
from app.results.store import ResultStore, database_url, open_database
from tests.live import free_port, wait_for


def postgres_server() -> Iterator[str]:
    """initdb + pg_ctl on a free loopback port; yields a SQLAlchemy URL; stops it after."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own user runs it
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL")
        run_as = ["runuser", "-u", "postgres", "--"]
    # outside pytest's private temporary folders, which the postgres user cannot enter
    root = Path(tempfile.mkdtemp(prefix="fracture-pg-"))
    root.chmod(0o755)
    if run_as:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "pgdata", free_port()
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-U", "fracture", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "-l",
            str(root / "pg.log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://fracture@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield database_url(tmp_path / "state", None)
    else:
        yield from postgres_server()


def answer(study_uid: str, result_id: str) -> StoredStudyAnswer:
    return StoredStudyAnswer.model_validate(
        {
            "request_id": "r",
            "models": {
                k: {"name": k, "version": "1"} for k in ("cropper", "classifier", "detector")
            },
            "operating_point": {
                "fp_per_image": 0.4,
                "detector_threshold": 0.3,
                "expected_recall": None,
            },
            "decision_threshold": 0.5,
            "images": [],
            "study": {
                "fracture_probability": 0.7,
                "fracture": True,
                "images": 1,
                "study_instance_uid": study_uid,
            },
            "result_id": result_id,
            "results_url": f"/dicomweb/studies/{study_uid}",
        }
    )


def test_results_are_never_replaced_and_survive_a_new_process(url: str):
    store = ResultStore(open_database(url), retention_s=3600)
    store.add("1.2.3", answer("1.2.3", "a"), [b"sr-a", b"sc-a"], "a")
    time.sleep(0.01)
    store.add("1.2.3", answer("1.2.3", "b"), [b"sr-b"], "b")  # the study analysed again
    assert store.count("1.2.3") == 2
    latest = store.get("1.2.3")
    assert latest.result_id == "b" and latest.instances == [b"sr-b"]
    assert [r.result_id for r in store.pending(time.time())] == ["a", "b"]

    first = store.pending(time.time())[0]
    first.attempts, first.last_error, first.next_attempt = 1, "HTTP 503", time.time() + 60
    store.record_attempt(first)
    again = ResultStore(open_database(url), retention_s=3600)  # a restarted process
    assert [r.result_id for r in again.pending(time.time())] == ["b"]  # "a" waits its backoff
    assert again.backlog() == 2
    second = again.pending(time.time())[0]
    second.attempts, second.delivered = 1, True
    again.record_attempt(second)
    assert again.backlog() == 1 and again.get("1.2.3").delivered is True
    assert again.get("1.2.3").findings.study.fracture_probability == pytest.approx(0.7)


def test_readings_are_kept_and_the_latest_per_image_exported(url: str):
    from app.results.feedback import FeedbackStore, Reading

    def reading(key: str, **judgement) -> Reading:
        return Reading.model_validate(
            {
                "request_id": "r1",
                "image_index": 0,
                "sop_instance_uid": key,
                "width": 100,
                "height": 80,
                "models": answer("1.2.3", "a").models.model_dump(),
                "verdict": "fracture",
                "fracture_probability": 0.8,
                **judgement,
            }
        )

    store = FeedbackStore(open_database(url))
    store.add(reading("1.2.3.1", agree=True, missed=[[1, 2, 30, 40]]), "key:abc")
    time.sleep(0.01)
    store.add(reading("1.2.3.1", agree=False), "sub:reader-2")  # a second reader's call
    store.add(reading("1.2.3.2", boxes=[{"box": [1, 1, 9, 9], "correct": False}]), "")
    again = FeedbackStore(open_database(url))  # a restarted process
    assert again.count() == 3
    assert [f.reader for f in again.list(request_id="r1")] == [
        "key:abc",
        "sub:reader-2",
        "anonymous",
    ]
    latest = again.latest_per_image()  # the box-only reading gives no label: not exported
    assert [(f.sop_instance_uid, f.reader_label) for f in latest] == [("1.2.3.1", False)]


def test_retention_drops_and_counts_the_undelivered(url: str, caplog):
    store = ResultStore(open_database(url), retention_s=0.05)
    store.add("1.2.4", answer("1.2.4", "c"), [b"x"], "c")
    store.add("1.2.5", answer("1.2.5", "d"), [b"y"], "d")
    delivered = store.get("1.2.5")
    delivered.delivered = True
    store.record_attempt(delivered)
    assert store.expire(time.time() + 1) == 1  # only the undelivered one counts as dropped
    assert store.get("1.2.4") is None and store.get("1.2.5") is None
    assert "result c dropped undelivered" in caplog.text


def test_the_default_database_is_one_sqlite_file_in_the_state_folder(tmp_path: Path):
    url = database_url(tmp_path / "deep" / "state", None)
    open_database(url)
    assert wait_for(lambda: (tmp_path / "deep" / "state" / "results.db").exists(), 5, "the file")
