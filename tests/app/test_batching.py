"""Dynamic batching across requests: studies that wait together share model calls, get the
answers they would get alone, and studies at another operating point are never mixed in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.batching import StudyBatcher
from app.core.config import Settings
from app.core.errors import ApiError
from app.inference import operating_point as op
from app.inference.decoding import decode
from app.inference.pipeline import ImageWork, run_study
from app.inference.plan import Plan
from app.inference.runtime import ModelRegistry
from tests.conftest import bone_phantom, png_bytes


@pytest.fixture(scope="module")
def models():
    s = Settings()
    registry = ModelRegistry(s.models_dir)
    registry.load_all("cpu", 0)
    return (
        registry.get("cropper", None, ""),
        registry.get("classifier", None, s.default_classifier),
        registry.get("detector", None, s.default_detector),
    )


def studies(n: int) -> list[list[ImageWork]]:
    out = []
    for i in range(n):
        image = decode(png_bytes(bone_phantom(300 + 20 * i, 260)), "image/png", None, 10**8, [])
        out.append([ImageWork(image=image, decode_ms=0.0)])
    return out


def test_concurrent_studies_share_batches_and_keep_their_answers(models):
    point = op.from_score(0.05)
    alone = studies(5)
    for works in alone:
        run_study(works, Plan.of(*models, point))
    sizes: list[int] = []

    async def scenario() -> list[list[ImageWork]]:
        batcher = StudyBatcher(
            workers=1, max_images=4, on_stage=lambda stage, s, n: sizes.append(n)
        )
        batcher.start()
        together = studies(5)
        await asyncio.gather(*(batcher.analyse(w, Plan.of(*models, point)) for w in together))
        await batcher.stop()
        return together

    together = asyncio.run(scenario())
    assert max(sizes) > 1 and max(sizes) <= 4  # batched, never past the bound
    for a, b in zip(alone, together, strict=True):
        assert b[0].probability == pytest.approx(a[0].probability, abs=1e-5)
        assert b[0].crop_box == a[0].crop_box
        assert np.allclose(b[0].boxes, a[0].boxes, atol=0.05)


def test_other_operating_points_are_not_mixed_and_gone_clients_are_skipped(models):
    sizes: list[int] = []
    abandoned: list[int] = []

    async def client_gone() -> None:  # what the service's check does for a gone client
        abandoned.append(1)
        raise ApiError(499, "client_closed_request", "the client disconnected")

    async def scenario() -> None:
        batcher = StudyBatcher(
            workers=1,
            max_images=8,
            on_stage=lambda stage, s, n: sizes.append(n),
        )
        batcher.start()
        a, b, c = studies(3)
        results = await asyncio.gather(
            batcher.analyse(a, Plan.of(*models, op.from_score(0.05))),
            batcher.analyse(b, Plan.of(*models, op.from_score(0.5))),
            batcher.analyse(c, Plan.of(*models, op.from_score(0.05)), client_gone),
            return_exceptions=True,
        )
        await batcher.stop()
        assert results[0] is None and results[1] is None
        assert isinstance(results[2], ApiError) and results[2].status == 499

    asyncio.run(scenario())
    assert abandoned == [1]
    assert set(sizes) == {1}  # a and b at different thresholds: two batches of one
