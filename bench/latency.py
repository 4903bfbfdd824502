"""The service as deployed against its own models: a real uvicorn process, real HTTP requests.

    python bench/latency.py [--images 50] [--port 8765] [--out bench/results.json]

Measures, in one run:
- the model-only bound: the default chain (cropper -> classifier with its card's test-time views
  -> detector) run back to back by onnxruntime in this process with the service's session
  options, on random inputs of the card sizes and on the real model inputs of the same JPEGs
  (the ratios below use the latter; `*_random_inputs` the former); sequential median per image,
  and images/s with `inference_workers` threads doing so;
- time from process start to /readyz = 200 and RSS after start-up;
- end-to-end latency per image (median, p95), one request at a time, over FracAtlas test JPEGs
  and over the shared DICOMs, and the ratio of the JPEG median to the model-only median;
- the same JPEGs set down at any angle: end to end, how many the upright turn turned, and the
  crop stage (where the turn runs) on those against the upright JPEGs';
- throughput and latency with 1/4/8/16 concurrent clients (images/s, p50/p95, 503s), and the
  ratio of the 8-client throughput to the model-only bound;
- decode time of the largest shared DICOM by bytes and by pixels (in process).
Needs ../shared/data. Run it while nothing else uses the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process (VmHWM: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def deflate_bomb(inflated_mb: int = 300) -> bytes:
    """A deflated DICOM of a few hundred KB whose dataset inflates to `inflated_mb` MB."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID, ds.Modality = generate_uid(), "DX"
    ds.add_new(0x00091010, "OB", b"\0" * (inflated_mb << 20))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bench_files(images: int) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(the first `images` FracAtlas test JPEGs, every shared DICOM the service takes), each with
    its content type."""
    test_names = (SHARED / "fracatlas" / "splits" / "test.txt").read_text().split()[:images]
    jpegs = []
    for name in test_names:
        for folder in ("Fractured", "Non_fractured"):
            p = SHARED / "fracatlas" / "images" / folder / name
            if p.exists():
                jpegs.append((p, "image/jpeg"))
    manifest = (SHARED / "dicom" / "MANIFEST.tsv").read_text().splitlines()[1:]
    dicoms = [
        (SHARED / "dicom" / row.split("\t")[0], "application/dicom")
        for row in manifest
        # the decodable limb and pelvis radiographs: chest films and mammograms are refused
        if row.split("\t")[-1] == "ok"
        and row.split("\t")[2] != "MG"
        and row.split("\t")[3] != "CHEST"
    ]
    return jpegs, dicoms


def start_service(port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The service as deployed (uvicorn, one process) on loopback; `env` adds settings."""
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})})


def wait_ready(client: httpx.Client, proc: subprocess.Popen) -> None:
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the service exited before it was ready")
        time.sleep(0.05)


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {
        "n": len(values),
        "median_ms": round(float(np.median(arr)), 1),
        "p95_ms": round(float(np.percentile(arr, 95)), 1),
        "mean_ms": round(float(arr.mean()), 1),
    }


def post_bodies(client: httpx.Client, bodies: list[tuple[bytes, str]]) -> list[tuple[float, dict]]:
    """Each body posted alone: (milliseconds, the answer's first image) per body."""
    out = []
    for data, ctype in bodies:
        t0 = time.perf_counter()
        r = client.post("/v1/predict", content=data, headers={"content-type": ctype})
        ms = 1000 * (time.perf_counter() - t0)
        r.raise_for_status()
        out.append((ms, r.json()["images"][0]))
    return out


def post_each(client: httpx.Client, files: list[tuple[Path, str]]) -> list[float]:
    return [ms for ms, _ in post_bodies(client, [(p.read_bytes(), ctype) for p, ctype in files])]


def tilted(jpegs: list[Path]) -> list[tuple[bytes, str]]:
    """The bench JPEGs set down at any angle, re-encoded as JPEG (quality 95) so that decode
    costs what a JPEG costs: the images on which the upright turn works. The angle is the
    `rotate` shift's (training/shifts.py: seeded by the image, canvas grown, black corners);
    Pillow turns the image here, so the bench needs only the service's install."""
    import io
    import random
    import zlib

    from PIL import Image

    out = []
    for path in jpegs:
        degrees = random.Random(zlib.crc32(f"rotate:{path.stem}".encode())).uniform(0.0, 360.0)
        grey = Image.open(path).convert("L")
        turned = grey.rotate(degrees, resample=Image.BILINEAR, expand=True, fillcolor=0)
        buf = io.BytesIO()
        turned.save(buf, format="JPEG", quality=95)
        out.append((buf.getvalue(), "image/jpeg"))
    return out


def upright_cost(upright: list[tuple[float, dict]], turned: list[tuple[float, dict]]) -> dict:
    """End to end over the tilted JPEGs, how many the service turned, and the crop stage (where
    the turn runs) on turned images against the upright JPEGs'."""
    is_turned = [any(n.startswith("turned ") for n in image["notes"]) for _, image in turned]
    crop = [
        image["timings_ms"]["crop"] for (_, image), t in zip(turned, is_turned, strict=True) if t
    ]
    return {
        **percentiles([ms for ms, _ in turned]),
        "turned": sum(is_turned),
        "crop_stage_median_ms_turned": round(float(np.median(crop)), 1) if crop else None,
        "crop_stage_median_ms_upright_jpegs": round(
            float(np.median([image["timings_ms"]["crop"] for _, image in upright])), 1
        ),
    }


def model_only(jpegs: list[Path], seconds: float = 8.0) -> dict[str, dict[str, float]]:
    """The default chain run back to back as the service runs it (its session options and
    test-time views), in this process, on two kinds of input: random tensors of the card sizes,
    and the real model inputs of the bench's JPEGs (their crops; a detector's work grows with
    what it finds, so real images cost more than noise)."""
    sys.path.insert(0, str(REPO))
    from app.core.config import RADIOGRAPH_MODALITIES, Settings
    from app.inference.decoding import decode
    from app.inference.pipeline import ImageWork, classify, run_study
    from app.inference.plan import resolve_plan
    from app.inference.preprocessing import grey_levels, model_input
    from app.inference.runtime import ModelRegistry

    s = Settings()
    registry = ModelRegistry(s.models_dir)
    registry.load_all("cpu", s.intra_op_threads, s.intra_op_spinning)
    plan = resolve_plan(registry, s)  # what the service runs, the orienter when it runs one
    crp, clf, det, ori = plan.cropper, plan.classifier, plan.detector, plan.orienter
    chain = [crp, clf, det] + ([ori] if ori else [])
    rng = np.random.default_rng(0)
    random_inputs = [
        [rng.random((1, m.spec.channels, *m.spec.size), dtype=np.float32)] for m in chain
    ]
    real_inputs: list[list[np.ndarray]] = [[] for _ in chain]
    for path in jpegs:
        image = decode(
            path.read_bytes(), "image/jpeg", path.name, 10**9, list(RADIOGRAPH_MODALITIES)
        )
        work = ImageWork(image=image, decode_ms=0.0)
        run_study([work], plan)
        pixels = work.image.pixels
        real_inputs[0].append(model_input(pixels, crp.spec, grey_levels(pixels))[0][None])
        real_inputs[1].append(model_input(work.crop, clf.spec, work.crop_levels)[0][None])
        real_inputs[2].append(model_input(work.crop, det.spec, work.crop_levels)[0][None])
        if ori:
            real_inputs[3].append(model_input(work.crop, ori.spec, work.crop_levels)[0][None])

    def measure(inputs: list[list[np.ndarray]]) -> dict[str, float]:
        n = len(inputs[0])

        def once(i: int) -> float:
            t0 = time.perf_counter()
            for model, batches in zip(chain, inputs, strict=True):
                if model is clf:  # with the card's test-time views
                    classify(clf, batches[i % n])
                else:
                    model.run(batches[i % n])
            return 1000 * (time.perf_counter() - t0)

        for i in range(5):
            once(i)
        sequential = [once(i) for i in range(max(60, n))]
        done = [0] * s.inference_workers
        stop = threading.Event()

        def worker(k: int) -> None:
            i = k
            while not stop.is_set():
                once(i)
                done[k] += 1
                i += s.inference_workers

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(s.inference_workers)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        return {
            "median_ms": round(float(np.median(sequential)), 1),
            "p95_ms": round(float(np.percentile(sequential, 95)), 1),
            "images_per_s": round(sum(done) / seconds, 2),
        }

    return {
        "chain": " -> ".join(m.name for m in chain),
        "workers": s.inference_workers,
        "classifier_views": clf.spec.tta,
        "card_size_random_inputs": measure(random_inputs),
        "real_inputs_of_the_bench_jpegs": measure(real_inputs),
    }


def concurrent(
    base: str, files: list[tuple[Path, str]], clients: int, requests: int
) -> dict[str, float]:
    """`requests` posts of the files (round robin) from `clients` concurrent clients."""
    bodies = [(p.read_bytes(), ctype) for p, ctype in files]

    def one(i: int, client: httpx.Client) -> tuple[int, float]:
        data, ctype = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        r = client.post("/v1/predict", content=data, headers={"content-type": ctype})
        return r.status_code, 1000 * (time.perf_counter() - t0)

    with httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: one(i, c), range(requests)))
        wall = time.perf_counter() - t0
    ok = [ms for code, ms in results if code == 200]
    return {
        "clients": clients,
        "requests": requests,
        "ok": len(ok),
        "rejected_503": sum(code == 503 for code, _ in results),
        "images_per_s": round(len(ok) / wall, 2),
        "p50_ms": round(float(np.median(ok)), 1) if ok else float("nan"),
        "p95_ms": round(float(np.percentile(ok, 95)), 1) if ok else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()
    jpegs, dicoms = bench_files(args.images)

    bound = model_only([p for p, _ in jpegs])  # before the service starts: the CPU to itself
    real, noise = bound["real_inputs_of_the_bench_jpegs"], bound["card_size_random_inputs"]
    print("model-only", bound, flush=True)

    t_start = time.perf_counter()
    proc = start_service(args.port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120) as client:
            wait_ready(client, proc)
            ready_s = time.perf_counter() - t_start
            rss_ready = rss_mib(proc.pid)
            post_each(client, jpegs[:3])  # first requests: allocator and caches
            jpeg_answers = post_bodies(client, [(p.read_bytes(), c) for p, c in jpegs])
            jpeg_ms = [ms for ms, _ in jpeg_answers]
            tilted_answers = post_bodies(client, tilted([p for p, _ in jpegs]))
            dicom_ms = post_each(client, dicoms)
            load = [
                concurrent(str(client.base_url), jpegs, n, max(40, 6 * n))
                for n in (1, 4, 8, 16, 64)
            ]
            rss_after = rss_mib(proc.pid)
            bomb = deflate_bomb()
            peak_before = rss_mib(proc.pid, "VmHWM")
            refused = client.post(
                "/v1/predict", content=bomb, headers={"content-type": "application/dicom"}
            )
            bomb_result = {
                "bytes": len(bomb),
                "inflates_to_mib": 300,
                "status": refused.status_code,
                "peak_rss_before_mib": round(peak_before, 1),
                "peak_rss_after_mib": round(rss_mib(proc.pid, "VmHWM"), 1),
            }
            models = {
                m["role"]: f"{m['name']} {m['version']} ({m['execution_provider']})"
                for m in client.get("/v1/models").json()["models"]
                if m["default"]
            }
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    sys.path.insert(0, str(REPO))
    import pydicom

    from app.core.config import RADIOGRAPH_MODALITIES
    from app.inference.decoding import decode

    def decode_ms(path: Path) -> float:
        data = path.read_bytes()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode(data, "application/dicom", path.name, 10**9, list(RADIOGRAPH_MODALITIES))
            times.append(1000 * (time.perf_counter() - t0))
        return round(float(np.median(times)), 1)

    def pixels(path: Path) -> int:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return int(ds.Rows) * int(ds.Columns)

    by_bytes = max((p for p, _ in dicoms), key=lambda p: p.stat().st_size)
    by_pixels = max((p for p, _ in dicoms), key=pixels)
    eight = next(x for x in load if x["clients"] == 8)["images_per_s"]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "models": models,
        "start_to_ready_s": round(ready_s, 2),
        "rss_after_startup_mib": round(rss_ready, 1),
        "rss_after_bench_mib": round(rss_after, 1),
        "model_only": bound,
        "fracatlas_jpeg_end_to_end": percentiles(jpeg_ms),
        "jpeg_median_over_model_only": round(float(np.median(jpeg_ms)) / real["median_ms"], 2),
        "jpeg_median_over_model_only_random_inputs": round(
            float(np.median(jpeg_ms)) / noise["median_ms"], 2
        ),
        "tilted_jpeg_end_to_end": upright_cost(jpeg_answers, tilted_answers),
        "concurrent_jpeg": load,
        "throughput_8_clients_over_model_only": round(eight / real["images_per_s"], 2),
        "throughput_8_clients_over_model_only_random_inputs": round(
            eight / noise["images_per_s"], 2
        ),
        "shared_dicom_end_to_end": percentiles(dicom_ms),
        "deflate_bomb": bomb_result,
        "largest_dicom_decode": {
            "file": by_bytes.name,
            "bytes": by_bytes.stat().st_size,
            "median_ms": decode_ms(by_bytes),
        },
        "largest_image_dicom_decode": {
            "file": by_pixels.name,
            "pixels": pixels(by_pixels),
            "median_ms": decode_ms(by_pixels),
        },
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
