"""The API contract under a larger fuzz than the test suite's: schemathesis against a real server.

Starts ``prunepilot serve`` (dispatcher off, so submitted jobs only queue) in a temporary data
directory with an API key, generates ``--examples`` requests per operation from the published
OpenAPI schema, and checks each response: no 5xx, only documented statuses and content types,
bodies of the documented models. Prints a table per operation and writes JSON.

    python benchmarks/api_fuzz.py [--examples 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from prunepilot.service.process import ServiceProcess

RESULTS = Path(__file__).parent / "results" / "api_fuzz.json"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500, help="generated requests per operation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServiceProcess(Path(tmp) / "srv", {"PRUNEPILOT_RUN_DISPATCHER": "0"})
        srv.cli("db", "upgrade")
        key = srv.cli("keys", "create", "--name", "fuzz").split()[-1]
        srv.start()
        try:
            schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
            rows = []
            for result in schema.get_all_operations():
                op = result.ok()
                sent, failures = 0, []
                started = time.perf_counter()

                @given(case=op.as_strategy())
                @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                def check(case) -> None:  # type: ignore[no-untyped-def]
                    nonlocal sent
                    sent += 1
                    case.call_and_validate(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)

                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - recorded per operation, the run goes on
                    failures.append(str(exc).strip().splitlines()[0][:300])
                rows.append({"operation": f"{op.method.upper()} {op.path}", "requests": sent, "failures": failures,
                             "seconds": round(time.perf_counter() - started, 1)})
                print(f"{rows[-1]['operation']:<50} {sent:>6} requests  {'FAIL: ' + failures[0] if failures else 'ok'}", flush=True)
        finally:
            srv.stop()
    total = sum(r["requests"] for r in rows)
    failed = [r for r in rows if r["failures"]]
    print(f"\n{total} requests over {len(rows)} operations; {len(failed)} operations with failures")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"examples_per_operation": args.examples, "requests": total, "operations": rows}, indent=2))


if __name__ == "__main__":
    main()
