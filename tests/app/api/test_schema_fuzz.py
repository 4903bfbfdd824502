"""Schemathesis against the live schema of a real server process: every operation of
/openapi.json called with generated requests (bounded examples, the same on every run), and
every answer checked against what the schema promises: no 5xx, documented status codes,
content types, bodies and headers.

One check is left out: "schema-valid data is accepted". A schema can say an upload is binary,
not that its bytes are a radiograph; random bytes that are schema-valid get 415/422 by design.
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.live import ServiceProcess, free_port

EXAMPLES = 15  # per operation
# STOW-RS bodies: generated as raw bytes (they rarely parse as multipart/related: 400s, tested).
schemathesis.serializer.alias("multipart/related", "application/octet-stream")


def test_every_operation_of_the_live_schema_keeps_its_promises():
    service = ServiceProcess(free_port())
    try:
        schema = schemathesis.openapi.from_url(f"{service.http.base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        statuses: list[int] = []
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def check(case) -> None:
                response = case.call_and_validate(
                    timeout=60, excluded_checks=[positive_data_acceptance]
                )
                statuses.append(response.status_code)

            check()
        assert len(statuses) >= 5 * len(operations)  # the examples did run
        print(
            f"{len(operations)} operations, {len(statuses)} calls:",
            sorted(Counter(statuses).items()),
        )
    finally:
        service.stop()
