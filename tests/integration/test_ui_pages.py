"""The dashboard (/ui) through an in-process client: real cell, real worker, real HTML.

Login with a token (good, bad, revoked), redirects, the jobs table and its filters, the
job page (steps, DAG, events, log tails, signed download links), the scheduler page,
owner scoping (another user's job is a 404 page), escaping and no open redirect.
"""

from __future__ import annotations

import re
import sys
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from jobcell.server.ui import COOKIE
from jobcell.server.ui_views import dag_layout, depths, safe_next

STAMP = ["stamp", "{output_dir}", "{name}", "{seconds}"]
STAMP_PARAMS = {"name": {"type": "string"}, "seconds": {"type": "number", "default": 0}}
XSS = "<script>alert('x')</script>"


def login(api: Any, name: str) -> TestClient:
    """A fresh browser-like client logged in as a new user ``name``."""
    token = api.cell.add_user(name)["token"]
    client = TestClient(api.app, raise_server_exceptions=False)
    answer = client.post("/ui/login", data={"token": token}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return client


def rows(html: str) -> list[str]:
    """The job ids of the jobs table's rows."""
    return re.findall(r'<tr data-job-id="([^"]+)"', html)


def submit(api: Any, owner: str, label: str = "demo", tags: tuple[str, ...] = (),
           runner: str = "write", **params: Any) -> str:
    params = params or {"text": f"{label} {owner} {tags}"}
    return api.cell.submit({"label": label, "tags": list(tags), "cache": False,
                            "steps": [{"runner": runner, "params": params}]},
                           owner=owner).job_id


@pytest.fixture
def ui(api: Any) -> Any:
    api.register("write", ["write", "{output_dir}", "out.txt", "{text}"],
                 params={"text": {"type": "string"}}, outputs=["out.txt"])
    api.register("stamp", STAMP, params=STAMP_PARAMS)
    api.register("join", ["join", "{input_dir}", "{output_dir}"], outputs=["listing.json"])
    api.register("lines", ["lines", "{n}"], params={"n": {"type": "integer"}})
    api.register("fail", ["exit", "{code}"], params={"code": {"type": "integer"}})
    return api


# -- login ---------------------------------------------------------------------------------

def test_pages_redirect_to_login_without_a_session(ui: Any) -> None:
    client = TestClient(ui.app)
    answer = client.get("/ui", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login"
    for path in ("/ui/jobs/123-abc?step=a", "/ui/scheduler", "/ui/jobs/rows?state=failed",
                 "/ui/nowhere"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        target = urlsplit(answer.headers["location"])
        assert target.path == "/ui/login"
        assert parse_qs(target.query)["next"] == [path]
    form = client.get("/ui/login?next=/ui/scheduler")
    assert form.status_code == 200 and "text/html" in form.headers["content-type"]
    assert '<input type="hidden" name="next" value="/ui/scheduler">' in form.text
    assert 'name="token" type="password"' in form.text


def test_login_with_a_good_token_sets_a_strict_http_only_cookie(ui: Any) -> None:
    token = ui.cell.add_user("alice")["token"]
    client = TestClient(ui.app)
    answer = client.post("/ui/login", data={"token": token, "next": "/ui/scheduler"},
                         follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/scheduler"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "samesite"} <= attributes and "secure" not in attributes
    assert "Path=/ui" in cookie and "SameSite=strict" in cookie
    page = client.get("/ui")
    assert page.status_code == 200
    assert 'Signed in as <strong class="user">alice</strong>' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"

    secure = TestClient(ui.app, base_url="https://testserver")
    answer = secure.post("/ui/login", data={"token": token}, follow_redirects=False)
    assert answer.headers["location"] == "/ui"
    assert "secure" in answer.headers["set-cookie"].lower()


def test_a_bad_or_empty_token_shows_the_form_again_with_a_message(ui: Any) -> None:
    client = TestClient(ui.app)
    for token, message in (("not-a-token", "unknown or has been revoked"),
                           ("", "Enter your API token")):
        answer = client.post("/ui/login", data={"token": token, "next": "/ui/scheduler"},
                             follow_redirects=False)
        assert answer.status_code == 401
        assert "set-cookie" not in answer.headers
        assert message in answer.text and 'role="alert"' in answer.text
        assert 'name="next" value="/ui/scheduler"' in answer.text
    assert client.get("/ui", follow_redirects=False).status_code == 303


def test_a_revoked_token_stops_working_at_once(ui: Any) -> None:
    client = login(ui, "carol")
    assert client.get("/ui").status_code == 200
    ui.cell.revoke_user("carol")
    answer = client.get("/ui/scheduler", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/ui/login?next=")
    assert f'{COOKIE}=""' in answer.headers["set-cookie"]   # the stale cookie is cleared


def test_log_out_clears_the_cookie(ui: Any) -> None:
    client = login(ui, "dave")
    answer = client.post("/ui/logout", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
    assert f'{COOKIE}=""' in answer.headers["set-cookie"]
    assert "Path=/ui" in answer.headers["set-cookie"]
    assert client.get("/ui", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", [
    "https://evil.example/", "//evil.example/ui", "/\\evil.example", "\\\\evil.example",
    "javascript:alert(1)", "http:/ui", "/api/v1/jobs", "/ui/login", "ui", "/uix",
    "/ui\r\nLocation: https://evil.example", " https://evil.example"])
def test_login_never_redirects_off_the_dashboard(ui: Any, target: str) -> None:
    token = ui.cell.add_user("eve")["token"]
    client = TestClient(ui.app)
    answer = client.post("/ui/login", data={"token": token, "next": target},
                         follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui"
    form = client.get("/ui/login", params={"next": target})
    assert '<input type="hidden" name="next" value="/ui">' in form.text


def test_safe_next_keeps_local_dashboard_paths() -> None:
    assert safe_next("/ui/jobs/1?step=a#logs") == "/ui/jobs/1?step=a#logs"
    assert safe_next("/ui?state=failed") == "/ui?state=failed"
    assert safe_next("/proxy/ui/scheduler", "/proxy") == "/proxy/ui/scheduler"
    assert safe_next("/ui/scheduler", "/proxy") == "/proxy/ui"
    assert safe_next(None) == safe_next("") == "/ui"


# -- jobs table ----------------------------------------------------------------------------

def test_jobs_table_shows_only_the_users_jobs_and_filters_them(ui: Any) -> None:
    first = submit(ui, "alice", "survey", ("north", "2024"))
    second = submit(ui, "alice", "survey", ("south",))
    other_label = submit(ui, "alice", "imaging", ("north",))
    failing = submit(ui, "alice", "imaging", ("north",), runner="fail", code=3)
    bobs = submit(ui, "bob", "survey", ("north",))
    ui.run_worker()
    client = login(ui, "alice")

    page = client.get("/ui")
    assert page.status_code == 200
    assert rows(page.text) == [failing, other_label, second, first]   # newest first
    assert bobs not in page.text
    assert '<span class="badge state-failed">failed</span>' in page.text
    assert '<span class="badge state-succeeded">succeeded</span>' in page.text
    assert '<span class="tag">north</span>' in page.text
    assert f'href="/ui/jobs/{first}"' in page.text
    assert 'data-live-src="/ui/jobs/rows"' in page.text

    assert rows(client.get("/ui?label=survey").text) == [second, first]
    assert rows(client.get("/ui?tag=north").text) == [failing, other_label, first]
    assert rows(client.get("/ui?state=failed").text) == [failing]
    filtered = client.get("/ui", params={"label": "imaging", "state": "succeeded",
                                         "tag": "north"})
    assert rows(filtered.text) == [other_label]
    # the filters stay in the form and in the live refresh URL
    assert 'id="f-label" name="label" type="text" value="imaging"' in filtered.text
    assert '<option value="succeeded" selected>' in filtered.text
    assert ('data-live-src="/ui/jobs/rows?label=imaging&amp;state=succeeded&amp;tag=north"'
            in filtered.text)
    # blank fields of the GET form mean "any"
    assert rows(client.get("/ui?label=&state=&tag=").text) == rows(page.text)
    nothing = client.get("/ui?label=none-such")
    assert rows(nothing.text) == [] and "No jobs match these filters." in nothing.text

    fragment = client.get("/ui/jobs/rows?state=failed")
    assert fragment.status_code == 200
    assert rows(fragment.text) == [failing]
    assert "<html" not in fragment.text and "<tbody" not in fragment.text

    bad = client.get("/ui?state=bogus")
    assert bad.status_code == 400 and "Unknown state" in bad.text
    assert "text/html" in bad.headers["content-type"]


def test_jobs_table_pages_through_many_jobs(ui: Any) -> None:
    ids = [submit(ui, "alice", "many", text=f"job {i}") for i in range(30)]
    client = login(ui, "alice")
    first = client.get("/ui?label=many")
    assert rows(first.text) == ids[::-1][:25]
    assert 'rel="next" href="/ui?label=many&amp;page=2"' in first.text
    assert 'rel="prev"' not in first.text
    second = client.get("/ui?label=many&page=2")
    assert rows(second.text) == ids[::-1][25:]
    assert 'rel="prev" href="/ui?label=many"' in second.text and 'rel="next"' not in second.text
    assert rows(client.get("/ui/jobs/rows?label=many&page=2").text) == ids[::-1][25:]
    assert "past the last one" in client.get("/ui?label=many&page=9").text
    bad = client.get("/ui?page=0")
    assert bad.status_code == 400 and "text/html" in bad.headers["content-type"]
    assert "page" in bad.text


# -- job page ------------------------------------------------------------------------------

def test_job_page_shows_steps_dag_events_logs_and_download_links(ui: Any) -> None:
    job = ui.cell.submit({"label": "pipeline", "tags": ["demo"], "pipeline": [
        {"id": "a", "runner": "stamp", "params": {"name": "a"}},
        {"id": "b", "runner": "stamp", "params": {"name": "b"}},
        {"id": "talk", "runner": "lines", "params": {"n": 3}},
        {"id": "join", "runner": "join", "inputs": ["a", "b"]}]}, owner="alice").job_id
    client = login(ui, "alice")
    queued = client.get(f"/ui/jobs/{job}")
    assert queued.status_code == 200
    assert f'data-live-src="/ui/jobs/{job}/live"' in queued.text   # refreshes while active
    assert "not started yet" in queued.text

    ui.run_worker()
    page = client.get(f"/ui/jobs/{job}")
    assert page.status_code == 200
    html = page.text
    assert "data-live-src" not in html and "data-live-done" in html     # ended: no refresh
    # summary
    assert "pipeline" in html and ">alice<" in html and '<span class="tag">demo</span>' in html
    assert "4 of 4" in html
    # the DAG: a, b and talk in the first column, join in the second, two edges into join
    nodes = dict(re.findall(r'<g class="node state-(\w+)" transform="translate\(([\d. ]+)\)"'
                            r' data-step', html))
    assert list(nodes) == ["succeeded"]
    positions = re.findall(r'transform="translate\(([\d.]+) ([\d.]+)\)" data-step="(\w+)"', html)
    x_of = {step: float(x) for x, _, step in positions}
    assert x_of["a"] == x_of["b"] == x_of["talk"] < x_of["join"]
    assert html.count('class="edge edge-succeeded"') == 2
    # the step table
    for step in ("a", "b", "talk", "join"):
        assert f'<tr id="step-{step}">' in html
    assert html.count('<span class="badge state-succeeded">succeeded</span>') >= 5
    # events, oldest first
    kinds = re.findall(r'<span class="event-kind">(\w+)</span>', html)
    assert kinds[0] == "submitted" and kinds[-1] == "job_succeeded"
    assert kinds.count("step_started") == 4
    # the log tail of each step (stdout and stderr)
    assert '<pre class="logtext" tabindex="0">out 0\nout 1\nout 2</pre>' in html
    assert '<pre class="logtext stderr" tabindex="0">err 0\nerr 1\nerr 2</pre>' in html
    tail = client.get(f"/ui/jobs/{job}?step=talk&lines=1")
    assert "out 2</pre>" in tail.text and "out 1" not in tail.text
    assert 'data-log-step="a"' not in tail.text
    # outputs with signed links that download (no server path shown)
    links = dict(re.findall(r'<td class="mono">(\w+\.\w+)</td>.*?href="([^"]+)"', html, re.S))
    assert set(links) == {"a.json", "a.txt", "b.json", "b.txt", "listing.json"}
    assert str(ui.cell.home.root) not in html
    href = unescape(links["a.txt"])
    assert "sig=" in href and "expires=" in href
    download = client.get(href)
    assert download.status_code == 200, download.text
    assert download.content == b"data from a\n"

    live = client.get(f"/ui/jobs/{job}/live")
    assert live.status_code == 200 and "<html" not in live.text
    assert 'id="summary-h"' in live.text and "data-live-done" in live.text


def test_a_big_job_is_listed_not_drawn_and_shows_logs_of_a_chosen_step(ui: Any) -> None:
    job = ui.cell.submit({"label": "wide", "pipeline": [
        {"id": f"n{i}", "runner": "write", "params": {"text": str(i)}} for i in range(160)]},
        owner="alice").job_id
    client = login(ui, "alice")
    html = client.get(f"/ui/jobs/{job}").text
    assert "<svg" not in html and "160 steps: too many to draw" in html
    assert html.count('<tr id="step-n') == 160
    assert "choose one to see its logs" in html and "data-log-step" not in html
    chosen = client.get(f"/ui/jobs/{job}?step=n7").text
    assert re.findall(r'data-log-step="(\w+)"', chosen) == ["n7"]
    assert 'value="n7"' in chosen
    assert f'data-live-src="/ui/jobs/{job}/live?step=n7"' in chosen


def test_a_failed_job_shows_its_error_and_stderr(ui: Any) -> None:
    job = submit(ui, "alice", "broken", runner="fail", code=7)
    ui.run_worker()
    client = login(ui, "alice")
    html = client.get(f"/ui/jobs/{job}").text
    assert '<span class="badge state-failed">failed</span>' in html
    assert 'class="alert job-error"' in html
    assert "exiting with 7" in html
    assert "step_failed" in html


def test_another_users_job_is_the_same_404_page_as_an_unknown_one(ui: Any) -> None:
    job = submit(ui, "alice", "secret")
    bob = login(ui, "bob")
    theirs = bob.get(f"/ui/jobs/{job}")
    unknown = bob.get("/ui/jobs/00000000000-000000000000")
    for answer, job_id in ((theirs, job), (unknown, "00000000000-000000000000")):
        assert answer.status_code == 404
        assert "text/html" in answer.headers["content-type"]
        assert f"no job with id &#39;{job_id}&#39;" in answer.text
    assert theirs.text.replace(job, "X") == unknown.text.replace("00000000000-000000000000",
                                                                 "X")
    assert "secret" not in theirs.text
    assert bob.get(f"/ui/jobs/{job}/live").status_code == 404
    assert job not in bob.get("/ui").text


def test_unknown_dashboard_pages_are_html_404s_and_static_files_are_served(ui: Any) -> None:
    client = login(ui, "alice")
    missing = client.get("/ui/no/such/page")
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
    assert "There is no dashboard page at /ui/no/such/page" in missing.text
    slash = client.get("/ui/", follow_redirects=False)
    assert slash.status_code == 308 and slash.headers["location"] == "/ui"
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        answer = client.get(f"/ui/static/{name}")
        assert answer.status_code == 200 and kind in answer.headers["content-type"], name
    assert client.get("/ui/static/none.css").status_code == 404


def test_an_unexpected_error_is_a_friendly_html_page(ui: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    client = login(ui, "alice")

    def broken() -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ui.cell, "scheduler_status", broken)
    answer = client.get("/ui/scheduler")
    assert answer.status_code == 500 and "text/html" in answer.headers["content-type"]
    assert "An unexpected server error; it was logged." in answer.text
    assert "secret internals" not in answer.text


def test_behind_a_proxy_prefix_links_and_the_cookie_carry_the_root_path(ui: Any) -> None:
    token = ui.cell.add_user("alice")["token"]
    client = TestClient(ui.app, root_path="/proxy")
    answer = client.get("/proxy/ui/scheduler", follow_redirects=False)
    assert answer.headers["location"] == "/proxy/ui/login?next=%2Fproxy%2Fui%2Fscheduler"
    answer = client.post("/proxy/ui/login", data={"token": token,
                                                  "next": "/proxy/ui/scheduler"},
                         follow_redirects=False)
    assert answer.headers["location"] == "/proxy/ui/scheduler"
    assert "Path=/proxy/ui" in answer.headers["set-cookie"]
    html = client.get("/proxy/ui/scheduler").text
    links = re.findall(r'(?:href|src|action)="(/[^"]*)"', html)
    assert links and all(link.startswith("/proxy/ui") for link in links), links
    assert client.get("/proxy/ui/static/dashboard.css").status_code == 200


# -- escaping ------------------------------------------------------------------------------

def test_labels_tags_errors_and_log_lines_render_as_text(ui: Any) -> None:
    code = "print(\"<script>alert('x')</script>\"); import sys; sys.exit('<b>bold</b>')"
    ui.cell.register_runner({"name": "shout", "command": sys.executable,
                             "args_template": ["-c", code]})
    job = ui.cell.submit({"label": XSS, "tags": ['"><img src=x onerror=alert(1)>'],
                          "steps": [{"runner": "shout"}]}, owner="alice").job_id
    ui.run_worker()
    client = login(ui, "alice")
    for path in ("/ui", f"/ui/jobs/{job}", f"/ui/jobs/{job}/live", "/ui/jobs/rows",
                 f"/ui?label={XSS}"):
        html = client.get(path).text
        assert "<script>alert" not in html, path
        assert "<img src=x" not in html and "<b>bold" not in html, path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html, path
    page = client.get(f"/ui/jobs/{job}").text
    assert "&lt;b&gt;bold&lt;/b&gt;" in page                      # stderr line
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page   # the tag


# -- scheduler page ------------------------------------------------------------------------

def test_scheduler_page_shows_capacity_queue_cooldowns_and_worker(make_api: Any) -> None:
    api = make_api(oom_cooldown_s=600, oom_throttle_hours=1)
    api.register("hog", ["exit", "137"], concurrency_group="heavy",
                 resources={"cpu_slots": 1, "memory_mb": 100})
    api.register("write", ["write", "{output_dir}", "out.txt", "{text}"],
                 params={"text": {"type": "string"}})
    api.cell.submit({"label": "oom", "steps": [{"runner": "hog"}]}, owner="alice")
    api.run_worker()
    assert api.cell.scheduler_status()["cooldowns"], "the OOM-like exit set no cooldown"
    for i in range(2):
        submit(api, "alice", "waiting", text=f"a{i}")
    for i in range(3):
        submit(api, "bob", "waiting", text=f"b{i}")
    client = login(api, "alice")

    page = client.get("/ui/scheduler")
    assert page.status_code == 200
    html = page.text
    assert 'aria-current="page">Scheduler' in html
    for name in ("CPU slots", "Memory", "GPUs"):
        assert f'data-resource="{name}"' in html
    assert "0 of 4 in use" in html and "none on this cell<" in html
    assert "0 MiB of 8.0 GiB in use" in html
    assert '<dd id="queue-depth">5</dd>' in html        # every owner's queued steps
    assert '<dd id="my-queued">2</dd>' in html          # only alice's own count
    assert "bob" not in html
    assert "<tr><td>write</td><td>5</td></tr>" in html
    assert "<td>heavy</td>" in html and '<span class="badge phase-cooldown">cooldown</span>' in html
    assert "not running" in html                        # no worker serves the cell now
    assert 'data-live-src="/ui/scheduler/live"' in html
    live = client.get("/ui/scheduler/live")
    assert live.status_code == 200 and '<dd id="my-queued">2</dd>' in live.text
    assert "<html" not in live.text


# -- pure helpers --------------------------------------------------------------------------

def test_dag_layout_puts_steps_in_columns_by_dependency_depth() -> None:
    steps = [{"id": "a", "inputs": []}, {"id": "b", "inputs": ["a"]},
             {"id": "c", "inputs": []}, {"id": "d", "inputs": ["b", "c"]},
             {"id": "e", "inputs": ["a"]}]
    assert depths(steps) == {"a": 0, "b": 1, "c": 0, "d": 2, "e": 1}
    layout = dag_layout(steps)
    assert [[n.step["id"] for n in column] for column in layout.columns] == [
        ["a", "c"], ["b", "e"], ["d"]]
    assert [(s.step["id"], t.step["id"]) for s, t, _ in layout.edges] == [
        ("a", "b"), ("b", "d"), ("c", "d"), ("a", "e")]
    xs = {n.step["id"]: n.x for n in layout.nodes}
    assert xs["a"] == xs["c"] < xs["b"] == xs["e"] < xs["d"]
    assert layout.width > 0 and layout.height > 0
    assert dag_layout([]).columns == []


def test_dag_edges_that_skip_columns_run_along_a_free_lane() -> None:
    steps = [{"id": "n", "inputs": []}, {"id": "s", "inputs": []},
             {"id": "report", "inputs": []}, {"id": "mosaic", "inputs": ["n", "s"]},
             {"id": "summary", "inputs": ["mosaic", "report"]},
             {"id": "late", "inputs": ["s", "summary"]}]
    layout = dag_layout(steps)
    mosaic = next(n for n in layout.nodes if n.step["id"] == "mosaic")
    summary = next(n for n in layout.nodes if n.step["id"] == "summary")
    paths = {(s.step["id"], t.step["id"]): path for s, t, path in layout.edges}
    assert " L" not in paths[("mosaic", "summary")]         # neighbours: one curve
    for edge, passes in ((("report", "summary"), [mosaic]),
                         (("s", "late"), [mosaic, summary])):
        lane = float(paths[edge].split(" L")[1].split()[1])
        for node in passes:
            assert not node.y <= lane <= node.y + layout.node_h, (edge, lane)
        assert lane <= layout.height
