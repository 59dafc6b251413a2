"""The dashboard's defences that need no browser: a Content-Security-Policy on its responses, and
a script that never turns strings into markup (the browser check is in test_dashboard.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[1] / "service" / "static" / "dashboard.js"


def directives(header: str) -> dict[str, list[str]]:
    parts = [d.split() for d in header.split(";") if d.strip()]
    return {p[0]: p[1:] for p in parts}


@pytest.mark.parametrize("path", ["/dashboard", "/static/dashboard.js", "/static/plotly.min.js"])
def test_dashboard_responses_carry_a_content_security_policy(api, path: str) -> None:
    r = api.client.get(path)
    assert r.status_code == 200
    csp = directives(r.headers["content-security-policy"])
    assert csp["script-src"] == ["'self'"]  # no inline script, no eval, no CDN: plotly is served by the API
    assert csp["default-src"] == ["'self'"] and csp["object-src"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_dashboard_script_builds_no_markup_from_strings() -> None:
    """User strings (job name, error, agent, arch, layer names) reach the page as text nodes only."""
    src = JS.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in src, sink
    assert "localStorage.setItem" not in src  # the API key lives in this tab's sessionStorage
