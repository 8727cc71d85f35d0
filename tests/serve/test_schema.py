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


def test_every_integer_a_request_may_send_is_bounded_in_the_schema():
    """Bounds in /openapi.json are what schemathesis explores (a seed past 2**64 was a 500)."""
    from vlmkit.serve.app import ServeSettings, create_app

    schemas = create_app(lambda: None, ServeSettings(model_name="x")).openapi()["components"]["schemas"]

    def integers(node, where):
        if isinstance(node, dict):
            if node.get("type") == "integer":
                yield where, node
            for key, value in node.items():
                yield from integers(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from integers(value, f"{where}.{i}")

    found = list(integers(schemas["ChatCompletionRequest"], "ChatCompletionRequest"))
    assert len(found) >= 4  # max_tokens, max_completion_tokens, seed, n (temperature / top_p are numbers)
    for where, node in found:
        assert "minimum" in node and "maximum" in node, where
