"""Model-only latency: each ONNX model in a folder run by onnxruntime on one input of its card's
size, as the service runs it (same session options). Writes bench/models.json.

    python bench/models.py [--models-dir models] [--runs 30] [--out bench/models.json]

Run it while nothing else uses the CPU: the figures are medians of `runs` calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from app.inference.runtime import ModelRegistry

REPO = Path(__file__).resolve().parents[1]


def time_model(model, runs: int) -> dict[str, float]:
    h, w = model.spec.size
    x = np.random.default_rng(0).random((1, model.spec.channels, h, w), dtype=np.float32)
    for _ in range(3):
        model.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(x)
        times.append(1000 * (time.perf_counter() - t0))
    return {
        "median_ms": round(float(np.median(times)), 2),
        "p95_ms": round(float(np.percentile(times, 95)), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "models.json")
    args = parser.parse_args()
    registry = ModelRegistry(args.models_dir)
    registry.load_all("cpu", 0)
    rows = {}
    for name, model in sorted(registry.models.items()):
        rows[name] = {
            "role": model.role,
            "input": list(model.spec.size),
            "file_mb": round(model.path.stat().st_size / 1e6, 1),
            **time_model(model, args.runs),
        }
        print(name, rows[name], flush=True)
    result = {
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
        "models": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
