"""Send a folder of studies through a running service, as a hospital audits a month of them.

    python -m tools.retrospective /data/2026-11 --url http://fracture:8000 --out audit.csv
    python -m tools.retrospective /data/2026-11 --out audit.csv     # again: resumes

Every DICOM, PNG and JPEG under the folder (nested; DICOM recognised by its bytes, whatever its
name) is posted to /v1/predict on its own, `--concurrency` at a time, and its answer is one CSV
row (appended and flushed as it comes, so an interrupted run loses nothing and a second run
skips what is written). A refused file is a row with its error code; a busy service (503) is
asked again after its Retry-After. Progress goes to stderr every `--every` files, TTY or not.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

COLUMNS = (
    "path",
    "status",
    "error",
    "verdict",
    "fracture",
    "fracture_probability",
    "ood_score",
    "out_of_distribution",
    "boxes",
    "best_box_score",
    "classifier",
    "detector",
    "request_id",
)
TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".dcm": "application/dicom",
}
RETRIES = 5


def content_type(path: Path) -> str | None:
    """The file's media type, DICOM by its preamble whatever its name; None: not an image."""
    known = TYPES.get(path.suffix.lower())
    if known:
        return known
    with open(path, "rb") as fh:
        head = fh.read(132)
    return "application/dicom" if head[128:132] == b"DICM" else None


def studies(folder: Path) -> Iterator[tuple[Path, str]]:
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = Path(root) / name
            ctype = content_type(path)
            if ctype:
                yield path, ctype


def done_already(out: Path) -> set[str]:
    if not out.exists():
        return set()
    with open(out, newline="") as fh:
        return {row["path"] for row in csv.DictReader(fh)}


def row_of(rel: str, response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        body = response.json()
    row: dict[str, Any] = {"path": rel, "status": response.status_code}
    if response.status_code != 200:
        return row | {"error": body.get("error", "http_error")}
    image = body["images"][0] if body.get("images") else {}
    scores = [d["score"] for d in image.get("detections", [])]
    return row | {
        "verdict": image.get("verdict"),
        "fracture": image.get("fracture"),
        "fracture_probability": image.get("fracture_probability"),
        "ood_score": image.get("ood_score"),
        "out_of_distribution": image.get("out_of_distribution"),
        "boxes": len(scores),
        "best_box_score": max(scores) if scores else None,
        "classifier": body["models"]["classifier"]["name"],
        "detector": body["models"]["detector"]["name"],
        "request_id": body.get("request_id"),
    }


def post(client: httpx.Client, path: Path, ctype: str, params: dict[str, str]) -> httpx.Response:
    """One file to /v1/predict; a 503 is asked again after its Retry-After."""
    data = path.read_bytes()
    for attempt in range(RETRIES + 1):
        response = client.post(
            "/v1/predict", content=data, headers={"content-type": ctype}, params=params
        )
        if response.status_code != 503 or attempt == RETRIES:
            return response
        time.sleep(min(60.0, float(response.headers.get("retry-after", 2))))
    return response


def run(
    folder: Path,
    out: Path,
    client: httpx.Client,
    concurrency: int = 2,
    params: dict[str, str] | None = None,
    every: int = 20,
) -> dict[str, int]:
    """Post every file not yet in `out`; the counts of this run."""
    skip = done_already(out)
    todo = [(p, c) for p, c in studies(folder) if str(p.relative_to(folder)) not in skip]
    new_file = not out.exists()
    counts = {"sent": 0, "analysed": 0, "refused": 0, "skipped_as_done": len(skip)}
    started = time.monotonic()
    with open(out, "a", newline="") as fh, ThreadPoolExecutor(concurrency) as pool:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        answers = pool.map(lambda pc: (pc[0], post(client, pc[0], pc[1], params or {})), todo)
        for path, response in answers:
            row = row_of(str(path.relative_to(folder)), response)
            writer.writerow(row)
            fh.flush()  # a kill loses at most the files in flight: a rerun sends them again
            counts["sent"] += 1
            counts["analysed" if row["status"] == 200 else "refused"] += 1
            if counts["sent"] % every == 0 or counts["sent"] == len(todo):
                rate = counts["sent"] / max(time.monotonic() - started, 1e-9)
                print(
                    f"retrospective: {counts['sent']}/{len(todo)} ({rate:.2f} files/s), "
                    f"{counts['refused']} refused",
                    file=sys.stderr,
                    flush=True,
                )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.retrospective",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    parser.add_argument("--out", type=Path, default=Path("retrospective.csv"))
    parser.add_argument("--key", default=os.environ.get("FRACTURE_KEY"), help="an API key")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--fp-per-image", help="the operating point (default: the service's)")
    parser.add_argument("--every", type=int, default=20, help="a progress line every N files")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(
            f"python -m tools.retrospective: error: {args.folder}: no such folder", file=sys.stderr
        )
        return 2
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    params = {"fp_per_image": args.fp_per_image} if args.fp_per_image else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
            client.get("/healthz").raise_for_status()
            counts = run(args.folder, args.out, client, args.concurrency, params, args.every)
    except httpx.HTTPError as exc:
        print(f"python -m tools.retrospective: error: {args.url}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
