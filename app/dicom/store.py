"""Results of analysed studies in a database, kept until the PACS has them (bounded by a
retention time), and the background delivery to a DICOMweb destination (STOW-RS client).

SQLite under `FRACTURE_STATE_DIR` by default (one file, nothing to install), any SQLAlchemy URL
(PostgreSQL: several replicas share results) with `FRACTURE_DATABASE_URL`. Each analysis is its
own record, never replaced: a study analysed twice has two results, both delivered; WADO-RS and
the findings show the latest. The delivery state lives in the same row, so that a restart after
SIGTERM or kill -9 resumes delivery where it stopped; a result is marked delivered only once the
destination acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)

from app.core.metrics import Metrics
from app.dicom.multipart import build_related
from app.inference.answers import StoredStudyAnswer

log = logging.getLogger("app.dicomweb.delivery")

schema = MetaData()
results_table = Table(
    "results",
    schema,
    Column("result_id", String(32), primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("created", Float, nullable=False),  # seconds since the epoch: survives restarts
    Column("findings", Text, nullable=False),  # the stored answer, JSON
    Column("delivered", Boolean, nullable=False, default=False),
    Column("given_up", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt", Float, nullable=False, default=0.0),
    Column("last_error", Text, nullable=True),
)
objects_table = Table(
    "result_objects",
    schema,
    Column(
        "result_id",
        String(32),
        ForeignKey("results.result_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),  # a Part 10 instance: the SR or a capture
)


@dataclass
class StudyResult:
    result_id: str
    study_uid: str
    findings: StoredStudyAnswer
    instances: list[bytes]  # the SR and the secondary captures, Part 10 encoded
    created: float = field(default_factory=time.time)
    delivered: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    given_up: bool = False  # the destination refused it for good (a 4xx other than 408/429)


def database_url(state_dir: Path, url: str | None) -> str:
    """The configured URL, or SQLite in the state folder (created)."""
    if url:
        return url
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state_dir.resolve() / 'results.db'}"


def open_database(url: str) -> Engine:
    """An engine with the tables created; SQLite in WAL mode with foreign keys on."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        pool_pre_ping=not sqlite,
        connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
    )
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:  # noqa: ANN001 (DB-API objects)
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            cur.execute("PRAGMA synchronous=FULL")  # a result acknowledged is on disk
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    schema.create_all(engine)
    return engine


class ResultStore:
    """Results in the database, each its own row; the latest per study is what is served."""

    def __init__(self, engine: Engine, retention_s: float):
        self.engine = engine
        self.retention_s = retention_s

    def add(
        self, study_uid: str, findings: StoredStudyAnswer, instances: list[bytes], result_id: str
    ) -> StudyResult:
        result = StudyResult(result_id, study_uid, findings, instances)
        with self.engine.begin() as db:
            db.execute(
                insert(results_table).values(
                    result_id=result_id,
                    study_uid=study_uid,
                    created=result.created,
                    findings=findings.model_dump_json(),
                    delivered=False,
                    given_up=False,
                    attempts=0,
                    next_attempt=0.0,
                )
            )
            if instances:
                db.execute(
                    insert(objects_table),
                    [
                        {"result_id": result_id, "seq": i, "data": data}
                        for i, data in enumerate(instances)
                    ],
                )
        return result

    def get(self, study_uid: str) -> StudyResult | None:
        """The latest result of a study."""
        with self.engine.connect() as db:
            row = db.execute(
                select(results_table)
                .where(results_table.c.study_uid == study_uid)
                .order_by(results_table.c.created.desc())
                .limit(1)
            ).first()
            return self._load(db, row) if row is not None else None

    def count(self, study_uid: str) -> int:
        with self.engine.connect() as db:
            return int(
                db.scalar(select(func.count()).where(results_table.c.study_uid == study_uid)) or 0
            )

    def pending(self, now: float) -> list[StudyResult]:
        """Results due for a delivery attempt, oldest first."""
        with self.engine.connect() as db:
            rows = db.execute(
                select(results_table)
                .where(
                    ~results_table.c.delivered,
                    ~results_table.c.given_up,
                    results_table.c.next_attempt <= now,
                )
                .order_by(results_table.c.created)
            ).all()
            return [self._load(db, row) for row in rows]

    def record_attempt(self, result: StudyResult) -> None:
        """Write back the delivery state of a result after an attempt."""
        with self.engine.begin() as db:
            db.execute(
                update(results_table)
                .where(results_table.c.result_id == result.result_id)
                .values(
                    delivered=result.delivered,
                    given_up=result.given_up,
                    attempts=result.attempts,
                    next_attempt=result.next_attempt,
                    last_error=result.last_error,
                )
            )

    def backlog(self) -> int:
        """Results still to deliver (not delivered, not given up)."""
        with self.engine.connect() as db:
            return int(
                db.scalar(
                    select(func.count()).where(
                        ~results_table.c.delivered, ~results_table.c.given_up
                    )
                )
                or 0
            )

    def expire(self, now: float) -> int:
        """Forget results past retention; the number dropped undelivered (each logged)."""
        cutoff = now - self.retention_s
        with self.engine.begin() as db:
            old = db.execute(
                select(
                    results_table.c.result_id,
                    results_table.c.delivered,
                    results_table.c.given_up,
                    results_table.c.attempts,
                    results_table.c.last_error,
                ).where(results_table.c.created < cutoff)
            ).all()
            dropped = 0
            for row in old:
                if not row.delivered and not row.given_up:
                    dropped += 1
                    log.error(
                        "result %s dropped undelivered after %d attempts (retention %.0f s): %s",
                        row.result_id,
                        row.attempts,
                        self.retention_s,
                        row.last_error,
                    )
            if old:
                ids = [row.result_id for row in old]
                db.execute(delete(objects_table).where(objects_table.c.result_id.in_(ids)))
                db.execute(delete(results_table).where(results_table.c.result_id.in_(ids)))
        return dropped

    @staticmethod
    def _load(db, row) -> StudyResult:  # noqa: ANN001 (SQLAlchemy connection and row)
        instances = db.scalars(
            select(objects_table.c.data)
            .where(objects_table.c.result_id == row.result_id)
            .order_by(objects_table.c.seq)
        ).all()
        return StudyResult(
            result_id=row.result_id,
            study_uid=row.study_uid,
            findings=StoredStudyAnswer.model_validate_json(row.findings),
            instances=[bytes(x) for x in instances],
            created=row.created,
            delivered=bool(row.delivered),
            attempts=int(row.attempts),
            next_attempt=float(row.next_attempt),
            last_error=row.last_error,
            given_up=bool(row.given_up),
        )


class Deliverer:
    """Stores every pending result at the destination's STOW-RS endpoint, retrying with backoff."""

    def __init__(
        self,
        store: ResultStore,
        destination: str,
        retry_s: float,
        max_backoff_s: float,
        timeout_s: float,
        auth: httpx.Auth | None = None,
        headers: dict[str, str] | None = None,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.metrics = metrics
        self.auth = auth
        self.headers = headers or {}
        self.url = destination.rstrip("/") + "/studies"
        self.retry_s = retry_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.wakeup = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(
            timeout=self.timeout_s, auth=self.auth, headers=self.headers
        ) as client:
            while True:
                now = time.time()
                dropped = await asyncio.to_thread(self.store.expire, now)
                if dropped and self.metrics is not None:
                    self.metrics.delivery_dropped.labels("retention").inc(dropped)
                for result in await asyncio.to_thread(self.store.pending, now):
                    await self._deliver(client, result)
                    await asyncio.to_thread(self.store.record_attempt, result)
                if self.metrics is not None:
                    self.metrics.delivery_backlog.set(await asyncio.to_thread(self.store.backlog))
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), timeout=self.retry_s)

    async def _deliver(self, client: httpx.AsyncClient, result: StudyResult) -> None:
        body, ctype = build_related(result.instances)
        result.attempts += 1
        try:
            response = await client.post(
                self.url,
                content=body,
                headers={"content-type": ctype, "accept": "application/dicom+json"},
            )
            ok, error = _stored(response)
        except httpx.HTTPError as exc:
            ok, error = False, type(exc).__name__
            response = None
        status = response.status_code if response is not None else 0
        if self.metrics is not None:
            self.metrics.delivery_attempts.labels("delivered" if ok else "failed").inc()
        if not ok and 400 <= status < 500 and status not in (408, 429):
            # The destination will refuse this again: stop, say so once, keep it retrievable.
            result.given_up, result.last_error = True, error
            if self.metrics is not None:
                self.metrics.delivery_dropped.labels("refused").inc()
            log.error(
                "result %s refused by the PACS (%s): not retried; still retrievable here",
                result.result_id,
                error,
            )
            return
        if ok:
            result.delivered = True
            result.last_error = None
            log.info(
                "result %s delivered to the PACS (%d objects, attempt %d)",
                result.result_id,
                len(result.instances),
                result.attempts,
            )
            return
        # Exponential backoff with jitter, so many failed results do not retry in lockstep.
        backoff = min(self.max_backoff_s, self.retry_s * 2 ** (result.attempts - 1))
        backoff *= random.uniform(0.8, 1.2)
        result.next_attempt = time.time() + backoff
        result.last_error = error
        log.warning(
            "delivery of result %s to the PACS failed (attempt %d, %s); retrying in %.0f s",
            result.result_id,
            result.attempts,
            error,
            backoff,
        )


def _stored(response: httpx.Response) -> tuple[bool, str | None]:
    """Whether a STOW-RS answer means every object was stored: a 202 listing failed SOP
    instances is a partial failure, not a success."""
    if response.status_code == 200:
        return True, None
    if response.status_code == 202:
        try:
            failed = response.json().get("00081198", {}).get("Value", [])
        except ValueError:
            failed = []
        if failed:
            return False, f"HTTP 202 with {len(failed)} failed object(s)"
        return True, None
    return False, f"HTTP {response.status_code}"
