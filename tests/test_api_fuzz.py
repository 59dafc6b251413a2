"""The OpenAPI contract, fuzzed: schemathesis generates requests from the schema the app publishes
and sends them to the app (in-process, dispatcher off), with a valid key. No request may get a 5xx,
and every response must match the schema (status documented, body of the documented model).
Bounded here (a few hundred cases); ``benchmarks/api_fuzz.py`` runs the same with more."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 25  # per operation
# What the contract promises: no server error, only documented statuses and content types, bodies of
# the documented models. (Not "every schema-valid request is accepted": a spec is JSON inside a form
# field, so most strings the schema allows are rightly refused with a 422.)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(api, max_examples: int) -> int:  # type: ignore[no-untyped-def]
    """Every operation of the published schema, ``max_examples`` generated requests each; returns the count sent."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            nonlocal sent
            sent += 1
            case.call_and_validate(headers=api.headers(), checks=CHECKS)

        check()
    return sent


def test_no_5xx_and_responses_match_the_schema(api) -> None:  # type: ignore[no-untyped-def]
    assert fuzz(api, MAX_EXAMPLES) > 100
