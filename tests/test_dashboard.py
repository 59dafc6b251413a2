"""The dashboard in a real browser (Debian's Chromium driven by Playwright) over a real server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
from pg import require_or_skip
from server import Server, migrate_with_keys

from prunepilot.service.client import Client

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def spec(agent: str, evals: int, **over) -> dict:  # type: ignore[no-untyped-def]
    s = {"arch": "resnet20", "dataset": "upload", "agent": agent, "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]},
         "search": {"max_evaluations": evals}, "fidelity": {"val_images": 100, "calib_images": 128}, "finetune": {"epochs": 0.0},
         "measure": {"test_images": 100, "latency_batches": [1]}}
    s.update(over)
    return s


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        require_or_skip("Chromium", "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, mini_zip: Path, resnet20_weights: Path):
    srv = Server(tmp_path_factory.mktemp("dash"))
    key = srv.prepare("dash")["dash"]
    srv.start()
    client = Client(srv.url, key)
    done = {}
    for agent, evals in (("uniform", 1), ("random", 4), ("sensitivity", 8), ("global", 1)):
        job = client.submit(spec(agent, evals), resnet20_weights, mini_zip)
        done[agent] = job["id"]
    failing = client.submit(spec("uniform", 1, budget={"constraints": [{"resource": "latency", "value": 1e6}]}),
                            resnet20_weights, mini_zip)
    solo = client.submit(spec("uniform", 1, budget={"constraints": [{"resource": "flops", "ratio": 0.6}]}), resnet20_weights, mini_zip)
    done["solo"] = solo["id"]
    for job_id in [*done.values(), failing["id"]]:
        client.wait(job_id, poll_s=0.5, timeout_s=600)
    yield srv, key, client, done, failing["id"]
    client.close()
    srv.stop()


def test_dashboard_shows_every_agent_and_updates_live(browser, seeded, mini_zip: Path, resnet20_weights: Path) -> None:
    srv, key, client, done, failing = seeded
    page = browser.new_page(viewport={"width": 1500, "height": 1800})
    page.goto(f"{srv.url}/dashboard#key={key}&job={done['random']}")
    page.locator("#scatter .scatterlayer .trace").first.wait_for(state="attached", timeout=30000)  # no string eval under the CSP
    traces = page.evaluate("""() => document.getElementById('scatter').data
        .filter(t => t.meta && t.meta.role === 'trials').map(t => ({agent: t.meta.agent, n: t.x.length}))""")
    agents = {t["agent"]: t["n"] for t in traces}
    assert set(agents) == {"uniform", "random", "sensitivity", "global"}  # the flops-0.6 job is another problem
    assert agents["random"] == 4 and agents["uniform"] == 1 and agents["global"] == 1
    assert agents["sensitivity"] == 1  # the scan's points are drawn in their own chart
    sens_lines = page.evaluate("() => document.getElementById('sensitivity').data.length")
    assert sens_lines >= 1
    bars = page.evaluate("() => document.getElementById('ratios').data.map(t => t.name)")
    assert len(bars) >= 4
    budget_line = page.evaluate("() => document.getElementById('scatter').layout.shapes[0].x0")
    assert budget_line == pytest.approx(0.5)
    # the failed job is listed with its error
    row = page.locator(f"tr[data-job='{failing}']")
    assert "failed" in row.inner_text() and "not below the dense" in row.inner_text()
    # a running job's progress moves without a reload
    job = client.submit(spec("random", 30), resnet20_weights, mini_zip)
    row = page.locator(f"tr[data-job='{job['id']}'] .progress-text")
    row.wait_for(timeout=20000)
    first = row.inner_text()
    deadline = time.time() + 120
    while time.time() < deadline and row.inner_text() == first:
        time.sleep(0.5)
    assert row.inner_text() != first
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    client.cancel(job["id"])
    csv = httpx.get(f"{srv.url}/v1/problems/{client.job(done['random'])['problem_key']}/export?format=csv",
                    headers={"Authorization": f"Bearer {key}"})
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("job_id,agent,step")
    page.close()


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory):
    """A migrated server that runs no jobs (the dashboard only reads what is there); each test
    takes a key of its own, so it sees only its own jobs."""
    srv = Server(tmp_path_factory.mktemp("reader"))
    srv.prepare()
    srv.env["PRUNEPILOT_RUN_DISPATCHER"] = "0"
    srv.start()
    yield srv
    srv.stop()


def test_empty_state_and_key_prompt(browser, reader: Server) -> None:
    key = migrate_with_keys(reader.db_url, "empty")["empty"]
    page = browser.new_page()
    page.goto(f"{reader.url}/dashboard")
    page.locator("#keyform").wait_for(state="visible", timeout=15000)  # no key yet: asks for one
    page.fill("#keyinput", key)
    page.click("#keyform button")
    page.locator("#jobs-empty").wait_for(state="visible", timeout=15000)
    assert "No jobs yet" in page.inner_text("#jobs-empty")
    assert page.locator("#problem").is_hidden()
    page.close()
    assert httpx.get(f"{reader.url}/static/plotly.min.js").status_code == 200  # served locally, no CDN
    assert httpx.get(f"{reader.url}/static/../settings.py").status_code == 404


def test_one_agent_problem_renders(browser, seeded) -> None:
    srv, key, client, done, _ = seeded
    page = browser.new_page()
    page.goto(f"{srv.url}/dashboard#key={key}&job={done['solo']}")
    page.locator("#scatter .scatterlayer .trace").first.wait_for(state="attached", timeout=30000)  # no string eval under the CSP
    roles = page.evaluate("() => document.getElementById('scatter').data.filter(t => t.meta && t.meta.role === 'trials').length")
    assert roles == 1
    assert page.locator("#finals tbody tr").count() == 1
    assert page.inner_text("#finals tbody tr td:last-child") == "met"  # its flops budget, as measured
    assert "60%" in page.inner_text("#problem-title")
    page.close()


XSS = '<img src=x onerror="window.__xss=1">'
# Records what the Content-Security-Policy blocks, so a policy too tight for plotly fails here.
WATCH_CSP = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


def plant_failed_run(srv: Server, job_id: str) -> None:
    """What a run could leave behind, with markup wherever a user's string reaches the page."""
    from prunepilot.service.db.engine import session_scope
    from prunepilot.service.db.models import Job, Trial

    costs = {"metrics": {}, "macs_ratio": 0.5, "params_ratio": 0.5, "size_ratio": 0.5, "wall_time_s": 1.0}
    with session_scope(f"sqlite:///{srv.data_dir / 'prunepilot.db'}") as s:
        job = s.get(Job, job_id)
        job.status, job.error, job.best_step, job.best_accuracy = "failed", f"boom: {XSS}", 0, 0.5
        s.add(Trial(job_id=job_id, step=0, agent=job.agent, kind="search", strategy={XSS: 0.5, "conv1": 0.2},
                    accuracy=0.5, feasible=True, **costs))
        s.add(Trial(job_id=job_id, step=1, agent=job.agent, kind="sensitivity", strategy={XSS: 0.3}, accuracy=0.4,
                    extra={"layer": XSS, "ratio": 0.3}, **costs))


def test_user_strings_render_as_text_under_the_csp(browser, reader: Server, mini_zip: Path, resnet20_weights: Path) -> None:
    """Stored XSS: a job name, an error and layer names holding markup show as text and run nothing."""
    srv = reader
    key = migrate_with_keys(srv.db_url, "xss")["xss"]
    with Client(srv.url, key) as client:
        job = client.submit(spec("uniform", 1, name=XSS), resnet20_weights, mini_zip)
    plant_failed_run(srv, job["id"])
    page = browser.new_page()
    page.add_init_script(WATCH_CSP)
    page.goto(f"{srv.url}/dashboard#key={key}")
    # a locator, not wait_for_function: that evaluates a string, which the policy (rightly) refuses
    page.locator("#sensitivity .scatterlayer .trace").first.wait_for(state="attached", timeout=30000)
    assert page.evaluate("() => window.__xss") is None
    row = page.locator(f"tr[data-job='{job['id']}']")
    assert row.locator("td").first.inner_text() == XSS
    assert row.locator(".error").inner_text() == f"boom: {XSS}"
    assert page.locator("main img").count() == 0
    assert XSS in page.locator("#ratios .xtick text").all_text_contents()  # plotly shows the layer name literally too
    assert page.evaluate("() => window.__csp") == []
    # the key stays in this tab, and leaves the address bar
    assert page.evaluate("() => localStorage.getItem('prunepilot-key')") is None
    assert page.evaluate("() => sessionStorage.getItem('prunepilot-key')") == key
    assert key not in page.url
    page.close()


def test_the_devices_panel_lists_devices_their_tables_and_jobs(browser, reader: Server, mini_zip: Path, resnet20_weights: Path) -> None:
    """Issue 22: each device with its agent's fingerprint (the agent's own string: shown as text), last
    seen, table entries, calibrated models, and this user's jobs on it; a job waiting for its device says so."""
    from prunepilot.service.auth import create_key
    from prunepilot.service.db import repo
    from prunepilot.service.db.engine import session_scope
    from prunepilot.service.db.models import Job

    key = migrate_with_keys(reader.db_url, "devices")["devices"]
    agent = create_key(reader.db_url, "board agent", device="board")[1]
    r = httpx.post(f"{reader.url}/v1/devices/board/register", headers={"Authorization": f"Bearer {agent}"},
                   json={"backend": "onnxruntime", "fingerprint": f"cpu={XSS}"})
    assert r.status_code == 200, r.text
    with Client(reader.url, key) as client:
        job = client.submit(spec("uniform", 1, name="on the board", target={"device": "board"},
                                 budget={"constraints": [{"resource": "latency", "ratio": 0.8}]}), resnet20_weights, mini_zip)
    with session_scope(reader.db_url) as s:
        s.get(Job, job["id"]).phase = "waiting for device board"  # as the worker writes it (no dispatcher here)
        for model in ("a", "b"):
            repo.put_latency_calibration(s, device=f"device=board|cpu={XSS}|batch=1", model_key=model, calibration={})
    page = browser.new_page()
    page.add_init_script(WATCH_CSP)
    page.goto(f"{reader.url}/dashboard#key={key}")
    row = page.locator("#devices tbody tr").first
    row.wait_for(state="attached", timeout=15000)
    cells = row.locator("td").all_inner_texts()
    assert cells[:4] == ["board", "connected", "onnxruntime", f"cpu={XSS}"] and cells[5:8] == ["0", "2", "0 / 0"]
    assert cells[8].split() == ["on", "the", "board", "queued"]
    assert page.locator(f"tr[data-job='{job['id']}'] .phase").inner_text() == "waiting for device board"
    assert page.evaluate("() => window.__xss") is None and page.evaluate("() => window.__csp") == []
    page.close()
