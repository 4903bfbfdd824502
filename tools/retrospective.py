"""Send a folder of studies through a running service, as a hospital audits a month of them.

    python -m tools.retrospective /data/2026-11 --url http://fracture:8000 --out audit.csv
    python -m tools.retrospective /data/2026-11 --out audit.csv     # again: resumes

Every DICOM, PNG and JPEG under the folder (nested; DICOM recognised by its bytes, whatever its
name) is posted to /v1/predict on its own, `--concurrency` at a time, and its answer is one CSV
row (appended and flushed as it comes, so an interrupted run loses nothing and a second run
skips what is written). A refused file is a row with its error code; a busy service (503) is
asked again after its Retry-After. Progress goes to stderr every `--every` files, TTY or not.

With `--sr DIR`, DICOM files go in through STOW-RS instead (the door a PACS uses), and the
service's DICOM results of each one's analysis, the Structured Report and the secondary
captures, are fetched by WADO-RS into DIR/<StudyInstanceUID>/<result_id>-<n>.dcm; PNG and JPEG
files, which carry no UIDs to report on, still go to /v1/predict.

    python -m tools.retrospective /data/2026-11 --out audit.csv --sr audit-sr/
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
    if "studies" in body:  # a STOW-RS answer: this one instance's study
        if not body["studies"]:
            failures = body.get("failures") or [{}]
            return row | {
                "error": failures[0].get("error", "stow_refused"),
                "request_id": body.get("request_id"),
            }
        body = body["studies"][0]
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


BOUNDARY = "retrospective-instance-boundary"


def post(
    client: httpx.Client, path: Path, ctype: str, params: dict[str, str], stow: bool = False
) -> httpx.Response:
    """One file to /v1/predict, or a DICOM file to STOW-RS; a 503 is asked again after its
    Retry-After."""
    data = path.read_bytes()
    url, headers = "/v1/predict", {"content-type": ctype}
    if stow and ctype == "application/dicom":
        url = "/dicomweb/studies"
        headers = {
            "content-type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "accept": "application/json",
        }
        data = (
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + data
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
    for attempt in range(RETRIES + 1):
        response = client.post(url, content=data, headers=headers, params=params)
        if response.status_code != 503 or attempt == RETRIES:
            return response
        time.sleep(min(60.0, float(response.headers.get("retry-after", 2))))
    return response


def save_results(client: httpx.Client, response: httpx.Response, sr_dir: Path) -> int:
    """The SR and captures of the analysis a STOW-RS answer names, as Part 10 files; how many."""
    from app.dicom.multipart import RelatedParser, media_params

    studies = (response.json().get("studies") or []) if response.status_code < 300 else []
    saved = 0
    for study in studies:
        uid, result_id = study["study"]["study_instance_uid"], study["result_id"]
        got = client.get(f"/dicomweb/studies/{uid}", params={"result_id": result_id})
        got.raise_for_status()
        parser = RelatedParser(media_params(got.headers["content-type"])[1]["boundary"], 1000)
        parser.feed(got.content)
        folder = sr_dir / uid
        folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(parser.finish()):
            (folder / f"{result_id}-{i}.dcm").write_bytes(part.body)
            saved += 1
    return saved


def run(
    folder: Path,
    out: Path,
    client: httpx.Client,
    concurrency: int = 2,
    params: dict[str, str] | None = None,
    every: int = 20,
    sr_dir: Path | None = None,
) -> dict[str, int]:
    """Post every file not yet in `out` (DICOM through STOW-RS with its results saved under
    `sr_dir` when given); the counts of this run."""
    skip = done_already(out)
    todo = [(p, c) for p, c in studies(folder) if str(p.relative_to(folder)) not in skip]
    new_file = not out.exists()
    counts = {"sent": 0, "analysed": 0, "refused": 0, "skipped_as_done": len(skip)}
    if sr_dir is not None:
        counts["result_objects"] = 0

    def send(item: tuple[Path, str]) -> tuple[Path, httpx.Response, int]:
        path, ctype = item
        response = post(client, path, ctype, params or {}, stow=sr_dir is not None)
        saved = save_results(client, response, sr_dir) if sr_dir is not None else 0
        return path, response, saved

    started = time.monotonic()
    with open(out, "a", newline="") as fh, ThreadPoolExecutor(concurrency) as pool:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for path, response, saved in pool.map(send, todo):
            row = row_of(str(path.relative_to(folder)), response)
            writer.writerow(row)
            fh.flush()  # a kill loses at most the files in flight: a rerun sends them again
            counts["sent"] += 1
            counts["analysed" if not row.get("error") else "refused"] += 1
            if sr_dir is not None:
                counts["result_objects"] += saved
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
    parser.add_argument(
        "--sr",
        type=Path,
        metavar="DIR",
        help="send DICOM through STOW-RS and save each analysis' SR and captures under DIR",
    )
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
            counts = run(
                args.folder, args.out, client, args.concurrency, params, args.every, args.sr
            )
    except httpx.HTTPError as exc:
        print(f"python -m tools.retrospective: error: {args.url}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
