"""JSON logs with the request id on every line of a request; the id echoed to the caller."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx

from app.core.logs import JsonFormatter, new_request_id, request_id
from tests.conftest import REPO, bone_phantom, png_bytes
from tests.live import free_port, wait_for


def test_every_line_is_one_json_object_with_the_request_id():
    record = logging.LogRecord("app.study", logging.INFO, __file__, 1, "%d image(s)", (2,), None)
    token = request_id.set("abc123")
    try:
        line = JsonFormatter().format(record)
    finally:
        request_id.reset(token)
    parsed = json.loads(line)
    assert parsed["message"] == "2 image(s)" and parsed["request_id"] == "abc123"
    assert parsed["level"] == "INFO" and parsed["ts"].endswith("Z")
    assert "request_id" not in json.loads(JsonFormatter().format(record))  # outside a request


def test_request_ids_are_plain_tokens():
    assert new_request_id("my-id-42") == "my-id-42"
    for hostile in ("", "a b", "x" * 200, "id\nforged log line"):
        rid = new_request_id(hostile)
        assert rid != hostile and rid.isalnum()


def test_the_request_id_is_echoed_and_reaches_the_logs(app_client, captured_logs):
    body = png_bytes(bone_phantom(200, 160))
    r = app_client.post(
        "/v1/predict",
        content=body,
        headers={"content-type": "image/png", "x-request-id": "trace-7781"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-7781"
    assert r.json()["request_id"] == "trace-7781"
    generated = app_client.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    access = [rec for rec in captured_logs.records if rec.name == "app.access"]
    assert any(getattr(rec, "status", None) == 200 and rec.path == "/v1/predict" for rec in access)


def test_metrics_carry_process_and_delivery_series(app_client):
    text = app_client.get("/metrics").text
    for name in (
        "process_resident_memory_bytes",
        "python_info",
        "fracture_delivery_backlog",
        "fracture_delivery_dropped_total",
        "fracture_requests_overloaded_total",
    ):
        assert name in text, name
    assert "_created" not in text  # timestamps no dashboard reads


def test_uvicorns_lines_are_json_too(tmp_path):
    """Everything the running process writes to its log is one JSON object per line, uvicorn's
    own lines (start-up, shutdown) included: a log pipeline never meets a plain-text line."""
    port = free_port()
    log = tmp_path / "stderr.log"
    env = {**os.environ, "FRACTURE_MODELS_DIR": str(tmp_path), "FRACTURE_STATE_DIR": str(tmp_path)}
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
            + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
            wait_for(lambda: client.get("/healthz").status_code == 200, 60, "the service")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # a plain-text line fails here
    loggers = {r["logger"] for r in records}
    assert any(name.startswith("uvicorn") for name in loggers), loggers
    assert any("startup complete" in r["message"] for r in records)
