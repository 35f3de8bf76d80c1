"""The dashboard in a real browser: Playwright driving Debian's Chromium (headless).

A real uvicorn server runs ``create_app`` for a real cell in a background thread on
127.0.0.1; a real worker runs the jobs in another thread. Chromium must be installed at
``/usr/bin/chromium`` (``apt-get install chromium``); without it these tests fail, they
are never skipped. Playwright never downloads a browser here.

Screenshots: ``test_screenshots_of_the_main_pages`` always takes them (1280x800) and checks
them; to keep them for the docs, name a folder in ``JOBCELL_SCREENSHOTS``:

    JOBCELL_SCREENSHOTS=docs/screenshots .venv/bin/pytest -q -p no:cacheprovider \\
        tests/integration/test_ui_browser.py -k screenshots

Run all of them with ``-m browser``.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from integration_support import register_tool, run_worker, wait_for

from jobcell.server import create_app
from jobcell.service import Cell
from jobcell.worker import Worker

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
STAMP = ["stamp", "{output_dir}", "{name}", "{seconds}"]
STAMP_PARAMS = {"name": {"type": "string"}, "seconds": {"type": "number", "default": 0}}
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOT_MAX_BYTES = 200_000
# Read at import: the suite's autouse fixture removes JOBCELL_* variables from each test.
KEEP_SCREENSHOTS = os.environ.get("JOBCELL_SCREENSHOTS")


# -- a real server, a real worker, a real browser -----------------------------------------

@contextmanager
def live_server(cell: Cell) -> Iterator[str]:
    """Serve the cell's app with uvicorn on a free loopback port; yields the base URL."""
    app = create_app(cell=cell, start_worker=False, callbacks=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="uvicorn")
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 20, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextmanager
def worker_thread(cell: Cell) -> Iterator[Worker]:
    """A real worker serving the cell in a thread until no job is active."""
    worker = Worker(cell.home, cell.settings, cell.store)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True}, daemon=True,
                              name="worker")
    thread.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        thread.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the dashboard's browser tests need Debian's "
                    "chromium (apt-get install chromium); they are never skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page_for(browser: Any) -> Iterator[Callable[[], Any]]:
    """New pages in fresh contexts; fails the test on any console error (CSP included)."""
    contexts: list[Any] = []
    errors: list[str] = []

    def factory() -> Any:
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield factory
    for context in contexts:
        context.close()
    # The login form answers a bad token with 401, which Chromium reports as an error.
    errors = [e for e in errors if "status of 401 (Unauthorized)" not in e]
    assert errors == [], f"the browser reported errors: {errors}"


def register_runners(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "stamp", STAMP, params=STAMP_PARAMS)
    register_tool(cell, tools, "join", ["join", "{input_dir}", "{output_dir}"],
                  outputs=["listing.json"])
    register_tool(cell, tools, "lines", ["lines", "{n}"], params={"n": {"type": "integer"}})
    register_tool(cell, tools, "fail", ["exit", "{code}"], params={"code": {"type": "integer"}})
    register_tool(cell, tools, "gated", ["gate-write", "{gate}", "{output_dir}"],
                  params={"gate": {"type": "string"}}, outputs=["result.txt"],
                  resources={"cpu_slots": 2, "memory_mb": 3072})


def pipeline(label: str = "geoscan", tags: tuple[str, ...] = ("survey-2024",)
             ) -> dict[str, Any]:
    """A small DAG: two tiles and a log-writing step, joined into a mosaic."""
    return {"label": label, "tags": list(tags), "pipeline": [
        {"id": "tile-north", "runner": "stamp", "params": {"name": "north"}},
        {"id": "tile-south", "runner": "stamp", "params": {"name": "south"}},
        {"id": "report", "runner": "lines", "params": {"n": 5}},
        {"id": "mosaic", "runner": "join", "inputs": ["tile-north", "tile-south"]},
        {"id": "summary", "runner": "join", "inputs": ["mosaic", "report"]}]}


def log_in(page: Any, base: str, token: str, path: str = "/ui") -> None:
    page.goto(base + path)
    assert "/ui/login" in page.url
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/ui/login" not in url)


def row(page: Any, job_id: str) -> Any:
    return page.locator(f'tr[data-job-id="{job_id}"]')


# -- flows ---------------------------------------------------------------------------------

def test_log_in_watch_jobs_live_open_a_job_and_log_out(make_cell: Callable[..., Cell],
                                                       tools: Path, tmp_path: Path,
                                                       page_for: Callable[[], Any]) -> None:
    from playwright.sync_api import expect

    cell = make_cell()
    register_runners(cell, tools)
    token = cell.add_user("alice")["token"]
    done = cell.submit(pipeline(), owner="alice").job_id
    failed = cell.submit({"label": "checks", "steps": [{"runner": "fail",
                                                        "params": {"code": 4}}]},
                         owner="alice").job_id
    run_worker(cell)
    gate_table, gate_page = tmp_path / "gate-table", tmp_path / "gate-page"
    watched = cell.submit({"label": "watched", "steps": [
        {"runner": "gated", "params": {"gate": str(gate_table)}}]}, owner="alice").job_id
    followed = cell.submit({"label": "followed", "steps": [
        {"runner": "gated", "params": {"gate": str(gate_page)}}]}, owner="alice").job_id

    with live_server(cell) as base, worker_thread(cell):
        try:
            page = page_for()
            # a bad token first, then the good one; we land on the page we asked for
            page.goto(base + "/ui?label=watched")
            page.get_by_label("API token").fill("wrong")
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("alert")).to_contain_text("unknown or has been revoked")
            page.get_by_label("API token").fill(token)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(f"{base}/ui?label=watched")
            expect(page.get_by_text("Signed in as alice")).to_be_visible()

            # the jobs table, then filtered by state through the form
            page.goto(base + "/ui")
            for job_id in (done, failed, watched, followed):
                expect(row(page, job_id)).to_be_visible()
            page.get_by_label("State").select_option("failed")
            page.get_by_role("button", name="Filter").click()
            page.wait_for_url("**/ui?*state=failed*")
            expect(page.locator("tr[data-job-id]")).to_have_count(1)
            expect(row(page, failed).locator(".badge")).to_have_text("failed")

            # a running job turns succeeded by live refresh, without a reload
            page.goto(base + "/ui")
            expect(row(page, watched).locator(".badge")).to_have_text("running",
                                                                      timeout=20_000)
            page.evaluate("window.__notReloaded = true")
            gate_table.touch()
            expect(row(page, watched).locator(".badge")).to_have_text("succeeded",
                                                                      timeout=20_000)
            assert page.evaluate("window.__notReloaded") is True
            expect(page.locator("[data-live-status]")).to_contain_text("Live")

            # the job page of a running job follows it to the end, then stops refreshing
            page.goto(f"{base}/ui/jobs/{followed}")
            summary = page.locator(".summary .badge").first
            expect(summary).to_have_text("running", timeout=20_000)
            page.evaluate("window.__notReloaded = true")
            gate_page.touch()
            expect(summary).to_have_text("succeeded", timeout=20_000)
            expect(page.locator("[data-live-done]")).to_have_count(1)
            expect(page.locator("[data-live-status]")).to_contain_text("Finished")
            assert page.evaluate("window.__notReloaded") is True
            expect(page.get_by_role("link", name="Download")).to_have_count(1)
        finally:
            gate_table.touch()
            gate_page.touch()

        # the finished pipeline: DAG, steps, events, log tail and a working download link
        page.goto(base + "/ui")
        row(page, done).get_by_role("link").click()
        page.wait_for_url(f"**/ui/jobs/{done}")
        expect(page.locator("svg.dag g.node")).to_have_count(5)
        expect(page.locator("svg.dag path.edge")).to_have_count(4)
        expect(page.locator("table.steps tbody tr")).to_have_count(5)
        expect(page.locator(".event-kind").last).to_have_text("job_succeeded")
        report = page.locator('[data-log-step="report"]')
        expect(report.locator("pre.logtext").first).to_have_text(
            "\n".join(f"out {i}" for i in range(5)))
        link = page.locator("tr", has_text="north.txt").get_by_role("link", name="Download")
        answer = page.request.get(link.get_attribute("href"))
        assert answer.status == 200 and answer.text() == "data from north\n"
        with page.expect_download() as download:
            link.click()
        assert Path(download.value.path()).read_text() == "data from north\n"
        page.locator("svg.dag a.node-link").first.click()    # a node links to its row
        assert page.url.endswith("#step-tile-north")

        # the scheduler page, then log out
        page.get_by_role("link", name="Scheduler").click()
        page.wait_for_url("**/ui/scheduler")
        expect(page.get_by_role("heading", name="Capacity and leases")).to_be_visible()
        expect(page.locator('[data-resource="CPU slots"] .bar-text')).to_contain_text("of 4")
        expect(page.locator("#my-queued")).to_have_text("0")
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url("**/ui/login")
        page.goto(base + "/ui/scheduler")
        assert "/ui/login?next=" in page.url
        assert page.context.cookies() == []


HIDE = """hidden => {
    Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
    document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_live_refresh_pauses_while_the_tab_is_hidden(make_cell: Callable[..., Cell],
                                                     page_for: Callable[[], Any]) -> None:
    from playwright.sync_api import expect

    cell = make_cell()
    token = cell.add_user("frank")["token"]
    with live_server(cell) as base:
        page = page_for()
        fetches: list[str] = []
        page.on("request", lambda r: fetches.append(r.url) if "/ui/jobs/rows" in r.url
                else None)
        with page.expect_request("**/ui/jobs/rows", timeout=10_000):
            log_in(page, base, token)
        page.evaluate(HIDE, True)
        expect(page.locator("[data-live-status]")).to_have_text("Paused while the tab is hidden")
        seen = len(fetches)
        page.wait_for_timeout(4_000)               # longer than the refresh interval
        assert len(fetches) == seen, "refreshed while hidden"
        with page.expect_request("**/ui/jobs/rows", timeout=1_500):
            page.evaluate(HIDE, False)             # visible again: refreshes at once


def test_a_revoked_token_sends_the_live_page_back_to_login(make_cell: Callable[..., Cell],
                                                           tools: Path, tmp_path: Path,
                                                           page_for: Callable[[], Any]
                                                           ) -> None:
    cell = make_cell()
    register_runners(cell, tools)
    token = cell.add_user("bob")["token"]
    cell.submit({"label": "pending", "steps": [
        {"runner": "gated", "params": {"gate": str(tmp_path / "never")}}]}, owner="bob")
    with live_server(cell) as base:
        page = page_for()
        log_in(page, base, token)
        cell.revoke_user("bob")
        page.wait_for_url("**/ui/login?next=%2Fui", timeout=15_000)   # by the live refresh
        assert page.locator("#token").is_visible()


def test_screenshots_of_the_main_pages(make_cell: Callable[..., Cell], tools: Path,
                                       tmp_path: Path, page_for: Callable[[], Any]) -> None:
    cell = make_cell(oom_cooldown_s=3600, oom_throttle_hours=2)
    register_runners(cell, tools)
    register_tool(cell, tools, "gpu-hog", ["exit", "137"], concurrency_group="gpu-heavy",
                  resources={"cpu_slots": 1, "memory_mb": 2048})
    token = cell.add_user("alice")["token"]
    shown = cell.submit(pipeline(), owner="alice").job_id
    stopped = cell.submit({"label": "ingest", "tags": ["survey-2025"], "steps": [
        {"runner": "gated", "params": {"gate": str(tmp_path / "never")}}]}, owner="alice")
    cell.cancel(stopped.job_id, owner="alice", wait_s=0)
    cell.submit({"label": "calibrate", "tags": ["nightly"], "steps": [
        {"runner": "fail", "params": {"code": 2}}]}, owner="alice")
    cell.submit({"label": "segment", "tags": ["gpu"], "steps": [{"runner": "gpu-hog"}]},
                owner="alice")
    run_worker(cell)
    cell.submit({"label": "segment", "tags": ["gpu", "retry"], "cache": False,
                 "steps": [{"runner": "gpu-hog"}]}, owner="alice")   # held by the cooldown
    gate = tmp_path / "gate"
    running = cell.submit({"label": "reproject", "tags": ["survey-2024"], "steps": [
        {"runner": "gated", "params": {"gate": str(gate)}}]}, owner="alice").job_id
    shots = tmp_path / "shots"
    shots.mkdir()

    with live_server(cell) as base, worker_thread(cell):
        try:
            wait_for(lambda: cell.status(running)["state"] == "running", 20, "a running job")
            page = page_for()
            page.goto(base + "/ui/login")
            page.screenshot(path=shots / "login.png")
            log_in(page, base, token, "/ui/login")
            page.goto(base + "/ui")
            page.locator("tr[data-job-id]").first.wait_for()
            page.screenshot(path=shots / "jobs.png")
            page.goto(f"{base}/ui/jobs/{shown}")
            page.locator("svg.dag").wait_for()
            page.screenshot(path=shots / "job.png")
            page.goto(base + "/ui/scheduler")
            page.locator(".cooldowns").wait_for()
            page.screenshot(path=shots / "scheduler.png")
        finally:
            gate.touch()

    names = ["job.png", "jobs.png", "login.png", "scheduler.png"]
    assert sorted(p.name for p in shots.iterdir()) == names
    for name in names:
        data = (shots / name).read_bytes()
        assert data.startswith(b"\x89PNG"), name
        assert int.from_bytes(data[16:20], "big") == VIEWPORT["width"], name
        assert int.from_bytes(data[20:24], "big") == VIEWPORT["height"], name
        assert len(data) < SCREENSHOT_MAX_BYTES, f"{name} is {len(data)} bytes"
    if KEEP_SCREENSHOTS:
        target = Path(KEEP_SCREENSHOTS)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(shots / name, target / name)
