"""Prometheus metrics: fracture_ prefix, base units, no per-request labels."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# No `*_created` series: a timestamp per counter and histogram that no dashboard reads (process-wide)
disable_created_metrics()

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("decode", "crop", "classify", "detect")


class Metrics:
    """One registry per app, so tests can build several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, RSS, open files), python_info and python_gc_*, as in the default registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.requests = Counter(
            "fracture_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "fracture_request_duration_seconds",
            "HTTP request duration",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "fracture_stage_duration_seconds",
            "Pipeline stage duration per batch",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("fracture_images", "Images by outcome", ["outcome"], registry=r)
        self.refused = Counter(
            "fracture_images_refused",
            "Images refused before analysis, by reason (the error code: out_of_scope, ...)",
            ["reason"],
            registry=r,
        )
        self.flagged = Counter(
            "fracture_images_flagged",
            "Analysed images flagged outside validated conditions, by classifier",
            ["classifier", "reason"],
            registry=r,
        )
        # Readers' agreement with the verdict: a falling share is drift a score cannot show.
        self.feedback = Counter(
            "fracture_feedback",
            "Readers' judgements of analysed images, by classifier and call "
            "(agree, disagree, doubt_resolved, boxes_only)",
            ["classifier", "call"],
            registry=r,
        )
        self.probability = Histogram(
            "fracture_image_probability",
            "Served fracture_probability per image, by classifier (drift of the score)",
            ["classifier"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.ood_score = Histogram(
            "fracture_image_ood_score",
            "ood_score per image, by classifier (drift away from the validated images)",
            ["classifier"],
            buckets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=r,
        )
        self.in_flight = Gauge("fracture_requests_in_flight", "Requests being served", registry=r)
        self.abandoned = Counter(
            "fracture_requests_abandoned",
            "Requests whose client disconnected before inference (not computed)",
            registry=r,
        )
        self.overloaded = Counter(
            "fracture_requests_overloaded",
            "Requests refused with 503 because the queue in front of the models was full",
            registry=r,
        )
        self.batch_size = Histogram(
            "fracture_inference_batch_size",
            "Images per model run",
            ["stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.model_info = Gauge(
            "fracture_model_info",
            "Loaded models (value 1)",
            ["role", "name", "version", "sha256_prefix", "execution_provider"],
            registry=r,
        )
        self.delivery_backlog = Gauge(
            "fracture_delivery_backlog",
            "Results waiting to reach the DICOMweb destination",
            registry=r,
        )
        self.delivery_attempts = Counter(
            "fracture_delivery_attempts",
            "Delivery attempts by outcome",
            ["outcome"],
            registry=r,
        )
        self.delivery_dropped = Counter(
            "fracture_delivery_dropped",
            "Results that never reached the destination (refused for good, or past retention)",
            ["reason"],
            registry=r,
        )
        for outcome in ("delivered", "failed"):
            self.delivery_attempts.labels(outcome)
        for reason in ("refused", "retention"):
            self.delivery_dropped.labels(reason)
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for outcome in ("fracture", "no_fracture", "rejected"):
            self.images.labels(outcome)
