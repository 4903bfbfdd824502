"""Results of analysed studies in a database, kept until the PACS has them (bounded by a
retention time); their delivery is `app.results.delivery`.

SQLite under `FRACTURE_STATE_DIR` by default (one file, nothing to install), any SQLAlchemy URL
(PostgreSQL: several replicas share results) with `FRACTURE_DATABASE_URL`. Each analysis is its
own record, never replaced: a study analysed twice has two results, both delivered; WADO-RS and
the findings show the latest. The delivery state lives in the same row, so that a restart after
SIGTERM or kill -9 resumes delivery where it stopped; a result is marked delivered only once the
destination acknowledged it. Instances received by STOW-RS or C-STORE are kept (intake) until
their results are stored, so a restart also finishes an analysis that a kill interrupted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

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

from app.inference.answers import StoredStudyAnswer

log = logging.getLogger("app.results")

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


intake_table = Table(
    "intake",
    schema,
    Column("job_id", String(32), primary_key=True),
    Column("created", Float, nullable=False),
    Column("fp_per_image", Float, nullable=True),  # the operating point asked for, or
    Column("score_threshold", Float, nullable=True),  # an explicit detector threshold
    Column("base_url", Text, nullable=False),
)
intake_objects_table = Table(
    "intake_objects",
    schema,
    Column("job_id", String(32), ForeignKey("intake.job_id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),  # an accepted instance as it arrived
)


@dataclass
class IntakeJob:
    """Accepted instances whose analysis has not finished (what a restart picks up)."""

    job_id: str
    instances: list[bytes]
    fp_per_image: float | None
    score_threshold: float | None
    base_url: str


def _insert_job(db, job: IntakeJob) -> None:  # noqa: ANN001 (SQLAlchemy connection)
    db.execute(
        insert(intake_table).values(
            job_id=job.job_id,
            created=time.time(),
            fp_per_image=job.fp_per_image,
            score_threshold=job.score_threshold,
            base_url=job.base_url,
        )
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

    def get(self, study_uid: str, result_id: str | None = None) -> StudyResult | None:
        """The latest result of a study, or the one analysis `result_id` of it."""
        query = select(results_table).where(results_table.c.study_uid == study_uid)
        if result_id is not None:
            query = query.where(results_table.c.result_id == result_id)
        with self.engine.connect() as db:
            row = db.execute(query.order_by(results_table.c.created.desc()).limit(1)).first()
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

    def accept(self, job: IntakeJob) -> None:
        """Keep accepted instances until their analysis has stored its results (one commit:
        the job and all its instances, as STOW-RS receives them)."""
        with self.engine.begin() as db:
            _insert_job(db, job)
            if job.instances:
                db.execute(
                    insert(intake_objects_table),
                    [
                        {"job_id": job.job_id, "seq": i, "data": data}
                        for i, data in enumerate(job.instances)
                    ],
                )

    def open_job(self, job: IntakeJob) -> None:
        """Start a job whose instances arrive one by one (a C-STORE association): each is kept
        by add_instance before it is acknowledged."""
        with self.engine.begin() as db:
            _insert_job(db, job)

    def add_instance(self, job_id: str, seq: int, data: bytes) -> None:
        """Keep one accepted instance of an open job (committed when this returns)."""
        with self.engine.begin() as db:
            db.execute(insert(intake_objects_table).values(job_id=job_id, seq=seq, data=data))

    def intake_size(self) -> int:
        """Instances accepted and not yet analysed (what the intake bound counts)."""
        with self.engine.connect() as db:
            return int(db.scalar(select(func.count()).select_from(intake_objects_table)) or 0)

    def finish(self, job_id: str) -> None:
        with self.engine.begin() as db:
            db.execute(delete(intake_objects_table).where(intake_objects_table.c.job_id == job_id))
            db.execute(delete(intake_table).where(intake_table.c.job_id == job_id))

    def unfinished(self) -> list[IntakeJob]:
        """Jobs accepted and not finished, oldest first: a previous process died during them."""
        with self.engine.connect() as db:
            rows = db.execute(select(intake_table).order_by(intake_table.c.created)).all()
            jobs = []
            for row in rows:
                data = db.scalars(
                    select(intake_objects_table.c.data)
                    .where(intake_objects_table.c.job_id == row.job_id)
                    .order_by(intake_objects_table.c.seq)
                ).all()
                jobs.append(
                    IntakeJob(
                        row.job_id,
                        [bytes(x) for x in data],
                        row.fp_per_image,
                        row.score_threshold,
                        row.base_url,
                    )
                )
            return jobs

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
