"""schemathesis against the server's own /openapi.json: no 500, every response matches the schema.

Seeded and bounded (hypothesis derandomised, a fixed number of examples per operation), so
the suite is repeatable and its time is fixed. (Driven through hypothesis directly:
schemathesis' pytest plugin does not load under pytest 9.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_api_conforms_to_its_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/chat/completions", "GET /v1/models", "GET /health", "GET /metrics"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        check()
