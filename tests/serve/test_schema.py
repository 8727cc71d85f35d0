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


def test_every_number_a_request_may_send_is_bounded_in_the_schema():
    """Bounds in /openapi.json are what schemathesis explores (a seed past 2**64 was a 500)."""
    from vlmkit.serve.app import ServeSettings, create_app

    app = create_app(lambda: None, ServeSettings(model_name="x"), scheduler_factory=lambda *_: None)
    schemas = app.openapi()["components"]["schemas"]

    def numbers(node, where):
        if isinstance(node, dict):
            assert not {"ge", "le", "gt", "lt"} & set(node), where  # pydantic's names: no JSON Schema bound
            if node.get("type") in ("integer", "number"):
                yield where, node
            for key, value in node.items():
                yield from numbers(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from numbers(value, f"{where}.{i}")

    found = dict(numbers(schemas["ChatCompletionRequest"], "request"))
    assert len(found) == 6, list(found)  # max_tokens, max_completion_tokens, temperature, top_p, seed, n
    for where, node in found.items():
        assert {"minimum", "exclusiveMinimum"} & set(node) and {"maximum", "exclusiveMaximum"} & set(node), where
