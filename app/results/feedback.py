"""Readers' feedback on answers: per image, agreement with the verdict (or the reader's own call
where the verdict was doubt), per box true or false, and boxes the models missed. Kept in the
results database beside the results (who, when, which models; never pixels), listed at
/v1/feedback and exported as the manifest that `python -m training adapt`, `evaluate` and
`calibrate` read, so a site goes from reading to adapting without another tool.

The answer a reading refers to comes with the reading (a /v1/predict answer is not kept by the
service); every reading is its own row, and the export takes each image's latest.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from typing import Self

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import Boolean, Column, Engine, Float, String, Table, Text, func, insert, select

from app.inference.answers import ModelsUsed
from app.inference.model_card import VerdictLevel
from app.results.store import schema

MAX_BOXES = 50
# Columns of the exported manifest (training/site.py reads them).
MANIFEST_COLUMNS = ("path", "sop_instance_uid", "fractured", "boxes")

feedback_table = Table(
    "feedback",
    schema,
    Column("feedback_id", String(32), primary_key=True),
    Column("created", Float, nullable=False, index=True),
    Column("reader", String(128), nullable=False),  # key:<id> or sub:<subject>, as in the audit
    Column("request_id", String(64), nullable=False, index=True),
    Column("image_key", String(255), nullable=False, index=True),
    Column("label", Boolean, nullable=True),  # the reader's call: fractured or not, or unknown
    Column("agree", Boolean, nullable=True),
    Column("reading", Text, nullable=False),  # the whole reading, JSON
)


class BoxJudgement(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels")
    score: float | None = Field(None, ge=0, le=1, description="the detector's score, as answered")
    correct: bool = Field(description="true: the box shows a fracture; false: it does not")


class Reading(BaseModel):
    """One reader's judgement of one analysed image."""

    request_id: str = Field(min_length=1, max_length=64, description="the answer's request_id")
    result_id: str | None = Field(None, max_length=32, description="a stored result's id")
    image_index: int = Field(ge=0, description="the image's index in the answer")
    filename: str | None = Field(None, max_length=255)
    sop_instance_uid: str | None = Field(None, max_length=64)
    width: int = Field(gt=0, description="the image's width in pixels, as answered")
    height: int = Field(gt=0)
    models: ModelsUsed = Field(description="the models of the answer, as answered")
    verdict: VerdictLevel = Field(description="the service's verdict for this image")
    fracture_probability: float = Field(ge=0, le=1)
    agree: bool | None = Field(
        None, description="the reader agrees with the verdict (fracture or no_fracture)"
    )
    fractured: bool | None = Field(
        None, description="the reader's own call (needed where the verdict was doubt)"
    )
    boxes: list[BoxJudgement] = Field([], max_length=MAX_BOXES)
    missed: list[list[float]] = Field(
        [], max_length=MAX_BOXES, description="fractures the models did not box, xyxy pixels"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not (self.filename or self.sop_instance_uid):
            raise ValueError("a reading names its image: filename or sop_instance_uid")
        for box in [b.box for b in self.boxes] + self.missed:
            if len(box) != 4:
                raise ValueError(f"a box is [x1, y1, x2, y2], got {box}")
            x1, y1, x2, y2 = box
            if not (0 <= x1 < x2 <= self.width and 0 <= y1 < y2 <= self.height):
                raise ValueError(f"box {box} lies outside the {self.width}x{self.height} image")
        if self.agree is not None and self.verdict == "doubt":
            raise ValueError("a doubt verdict is answered with fractured: true or false, not agree")
        if self.agree is None and self.fractured is None and not self.boxes and not self.missed:
            raise ValueError("an empty reading: give agree, fractured, box judgements or missed")
        implied = self.implied_label()
        if self.fractured is not None and implied is not None and implied != self.fractured:
            raise ValueError("fractured contradicts agree with this verdict")
        if self.label() is False and (self.missed or any(b.correct for b in self.boxes)):
            raise ValueError("a box marked as a fracture on an image read as not fractured")
        return self

    def implied_label(self) -> bool | None:
        """What agreeing or disagreeing with a fracture / no_fracture verdict says."""
        if self.agree is None or self.verdict == "doubt":
            return None
        return (self.verdict == "fracture") == self.agree

    def label(self) -> bool | None:
        """The reader's call: fractured, not fractured, or unknown (boxes judged only false)."""
        if self.fractured is not None:
            return self.fractured
        implied = self.implied_label()
        if implied is not None:
            return implied
        return True if self.missed or any(b.correct for b in self.boxes) else None

    @property
    def image_key(self) -> str:
        return self.sop_instance_uid or self.filename or ""


class StoredFeedback(Reading):
    feedback_id: str
    created: float = Field(description="seconds since the epoch")
    reader: str = Field(description="key:<key id> or sub:<token subject>; anonymous when open")
    reader_label: bool | None = Field(description="the label this reading gives the image")


class FeedbackStore:
    """Readings in the results database, each its own row."""

    def __init__(self, engine: Engine):
        self.engine = engine
        feedback_table.create(engine, checkfirst=True)  # a database older than feedback

    def add(self, reading: Reading, reader: str) -> StoredFeedback:
        stored = StoredFeedback(
            **reading.model_dump(),
            feedback_id=uuid.uuid4().hex,
            created=time.time(),
            reader=reader or "anonymous",
            reader_label=reading.label(),
        )
        with self.engine.begin() as db:
            db.execute(
                insert(feedback_table).values(
                    feedback_id=stored.feedback_id,
                    created=stored.created,
                    reader=stored.reader,
                    request_id=stored.request_id,
                    image_key=reading.image_key,
                    label=stored.reader_label,
                    agree=stored.agree,
                    reading=stored.model_dump_json(),
                )
            )
        return stored

    def list(
        self, request_id: str | None = None, since: float | None = None, limit: int = 1000
    ) -> list[StoredFeedback]:
        """Readings, oldest first."""
        query = select(feedback_table.c.reading).order_by(feedback_table.c.created)
        if request_id is not None:
            query = query.where(feedback_table.c.request_id == request_id)
        if since is not None:
            query = query.where(feedback_table.c.created >= since)
        with self.engine.connect() as db:
            rows = db.execute(query.limit(limit)).all()
        return [StoredFeedback.model_validate_json(row.reading) for row in rows]

    def latest_per_image(self) -> list[StoredFeedback]:
        """Each image's latest reading that gives it a label (oldest image first)."""
        latest: dict[str, str] = {}  # JSON kept, parsed once for the readings that count
        query = (
            select(feedback_table.c.image_key, feedback_table.c.reading)
            .where(feedback_table.c.label.is_not(None))
            .order_by(feedback_table.c.created)
        )
        with self.engine.connect() as db:
            for row in db.execute(query):
                latest.pop(row.image_key, None)  # re-inserted: ordered by its latest reading
                latest[row.image_key] = row.reading
        return [StoredFeedback.model_validate_json(text) for text in latest.values()]

    def count(self) -> int:
        with self.engine.connect() as db:
            return int(db.scalar(select(func.count()).select_from(feedback_table)) or 0)


def manifest_csv(readings: list[StoredFeedback]) -> str:
    """The site manifest (path, sop_instance_uid, fractured, boxes in image pixels): boxes are
    those the reader called true and those they drew; an image read as not fractured has none."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for r in readings:
        boxes = (
            [[round(v, 1) for v in b.box] for b in r.boxes if b.correct]
            + [[round(v, 1) for v in box] for box in r.missed]
            if r.reader_label
            else []
        )
        writer.writerow(
            [
                r.filename or "",
                r.sop_instance_uid or "",
                int(bool(r.reader_label)),
                json.dumps(boxes) if boxes else "",
            ]
        )
    return out.getvalue()
