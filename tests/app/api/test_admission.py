"""Admission control against a real server process: past the queue bound a burst gets 503 with
Retry-After at once, nothing hangs, and clients that gave up are not computed."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.admission import Admission
from app.core.errors import ApiError
from tests.conftest import bone_phantom, png_bytes
from tests.live import ServiceProcess, free_port


def test_admission_refuses_past_capacity():
    async def scenario() -> None:
        rejected: list[int] = []
        gate = Admission(workers=1, max_queue=1, on_reject=lambda: rejected.append(1))
        async with gate.admit(), gate.admit():
            with pytest.raises(ApiError) as err:
                async with gate.admit():
                    pass
            assert err.value.status == 503 and int(err.value.headers["Retry-After"]) >= 1
        async with gate.admit():  # places come back
            pass
        assert rejected == [1]

    asyncio.run(scenario())


def metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_a_burst_past_the_bound_gets_503_and_abandoned_requests_are_not_computed():
    image = png_bytes(bone_phantom(1400, 1100))
    service = ServiceProcess(free_port(), FRACTURE_INFERENCE_WORKERS="1", FRACTURE_MAX_QUEUE="2")
    try:
        base = str(service.http.base_url)

        async def one(client: httpx.AsyncClient) -> httpx.Response | None:
            try:
                return await client.post(
                    "/v1/predict", content=image, headers={"content-type": "image/png"}
                )
            except httpx.TimeoutException:
                return None

        async def burst(n: int, timeout: float) -> list[httpx.Response | None]:
            async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:
                return await asyncio.gather(*(one(client) for _ in range(n)))

        answers = asyncio.run(burst(12, 60))
        assert all(a is not None for a in answers), "a request hung"
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and codes.count(200) >= 3 and codes.count(503) >= 1
        for a in answers:
            if a.status_code == 503:
                assert a.json()["error"] == "overloaded" and int(a.headers["Retry-After"]) >= 1
        text = service.http.get("/metrics").text
        assert metric(text, "fracture_requests_overloaded_total") == codes.count(503)

        # Clients that give up while queued behind a long request: dropped before inference.
        small = png_bytes(bone_phantom(120, 100))

        async def give_up_while_queued() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=60) as patient:
                # Long enough (24 images, seconds on any CPU) that both impatient clients time
                # out behind it, and only started on once the server holds it: no race with a
                # fast machine.
                study = [("files", (f"v{i}.png", image, "image/png")) for i in range(24)]
                long = asyncio.create_task(patient.post("/v1/predict", files=study))
                while True:
                    await asyncio.sleep(0.05)
                    scrape = await patient.get("/metrics")
                    if metric(scrape.text, "fracture_requests_in_flight") >= 1:
                        break
                await asyncio.sleep(0.2)  # its upload read, the study is computing
                async with httpx.AsyncClient(base_url=base, timeout=0.3) as impatient:
                    for _ in range(2):
                        with pytest.raises(httpx.TimeoutException):
                            await impatient.post(
                                "/v1/predict", content=small, headers={"content-type": "image/png"}
                            )
                assert (await long).status_code == 200

        asyncio.run(give_up_while_queued())
        service.http.get("/healthz")
        text = service.http.get("/metrics").text
        assert metric(text, "fracture_requests_abandoned_total") >= 1
        assert 'status="500"' not in text
    finally:
        service.stop()


def test_a_body_shorter_than_announced_gets_408_not_500():
    """A client that announces 1000 bytes and sends 10: 408 after the read timeout, counted as
    408 (not as a server error), and the server keeps serving."""
    import socket
    import time

    port = free_port()
    service = ServiceProcess(port, FRACTURE_BODY_READ_TIMEOUT_S="1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000\r\n\r\n0123456789"
            )
            t0 = time.monotonic()
            reply = b""
            while b"request_timeout" not in reply:  # headers and body may arrive apart
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
            reply = reply.decode("latin-1")
            waited = time.monotonic() - t0
        assert reply.startswith("HTTP/1.1 408"), reply[:80]
        assert "request_timeout" in reply and waited < 5
        text = service.http.get("/metrics").text
        assert 'status="408"' in text and 'status="500"' not in text
        assert service.http.get("/readyz").status_code == 200
    finally:
        service.stop()
