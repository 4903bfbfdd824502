"""Two model folders served side by side, timed request by request in alternation.

    python bench/paired.py --baseline /path/to/models-before [--candidate models] [--images 50]

This machine's speed drifts by tens of percent between minutes and sessions (the same unchanged
decode has measured 38 and 102 ms), so two `latency.py` runs do not compare two builds. Here one
service per folder runs (FRACTURE_MODELS_DIR), both idle but for the request in flight, and each
FracAtlas test JPEG and shared DICOM goes to one and then the other (the order alternating), so a
slower minute falls on both alike. Reports each side's median and p95 and the median per-request
ratio (candidate / baseline); writes bench/results-paired.json (or --out). Run it while nothing
else uses the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import REPO, bench_files, percentiles, post_bodies, start_service, wait_ready  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="models folder A")
    parser.add_argument("--candidate", type=Path, default=REPO / "models", help="models folder B")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--port", type=int, default=8775)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-paired.json")
    args = parser.parse_args()
    jpegs, dicoms = bench_files(args.images)
    folders = {"baseline": args.baseline.resolve(), "candidate": args.candidate.resolve()}
    procs = {
        side: start_service(args.port + i, {"FRACTURE_MODELS_DIR": str(folder)})
        for i, (side, folder) in enumerate(folders.items())
    }
    clients = {
        side: httpx.Client(base_url=f"http://127.0.0.1:{args.port + i}", timeout=120)
        for i, side in enumerate(procs)
    }
    try:
        for side, client in clients.items():
            wait_ready(client, procs[side])
        models = {
            side: {
                m["role"]: f"{m['name']} {m['version']}"
                for m in c.get("/v1/models").json()["models"]
                if m["default"]
            }
            for side, c in clients.items()
        }
        result: dict = {"folders": {k: str(v) for k, v in folders.items()}, "models": models}
        for kind, files in (("fracatlas_jpeg", jpegs), ("shared_dicom", dicoms)):
            bodies = [(p.read_bytes(), ctype) for p, ctype in files]
            for client in clients.values():
                post_bodies(client, bodies[:2])  # first requests: allocator and caches
            ms: dict[str, list[float]] = {side: [] for side in clients}
            for i, (data, ctype) in enumerate(bodies):
                order = list(clients) if i % 2 == 0 else list(clients)[::-1]
                for side in order:
                    ms[side].append(post_bodies(clients[side], [(data, ctype)])[0][0])
            ratio = np.asarray(ms["candidate"]) / np.asarray(ms["baseline"])
            result[kind] = {side: percentiles(v) for side, v in ms.items()}
            result[kind]["median_ratio_candidate_over_baseline"] = round(float(np.median(ratio)), 3)
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
