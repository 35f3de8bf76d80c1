"""Bearer tokens, owner scoping and the admin key, over the REST API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import Api

STAMP = ["stamp", "{output_dir}", "{name}", "0"]
ADMIN_KEY = "correct horse battery staple"

# Every bearer-protected route, with a job id placeholder where one goes.
ROUTES = [("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs/{job}"),
          ("GET", "/api/v1/jobs/{job}/result"), ("GET", "/api/v1/jobs/{job}/logs"),
          ("GET", "/api/v1/jobs/{job}/events"), ("GET", "/api/v1/jobs/{job}/outputs"),
          ("DELETE", "/api/v1/jobs/{job}"), ("GET", "/api/v1/runners"),
          ("GET", "/api/v1/runners/stamp"), ("GET", "/api/v1/capabilities"),
          ("GET", "/api/v1/scheduler"), ("GET", "/api/v1/me"), ("POST", "/api/v1/uploads"),
          ("GET", "/api/v1/admin/jobs"), ("DELETE", "/api/v1/admin/jobs/{job}"),
          ("POST", "/api/v1/admin/cancel")]
JOB_ROUTES = [(method, path) for method, path in ROUTES
              if "{job}" in path and "/admin/" not in path]


def problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return str(response.json()["detail"])


def job_spec(name: str, tags: list[str] | None = None) -> dict[str, Any]:
    return {"label": "auth", "tags": tags or [],
            "steps": [{"runner": "stamp", "params": {"name": name}}]}


def submit(api: Api, headers: dict[str, str], name: str, tags: list[str] | None = None) -> str:
    response = api.client.post("/api/v1/jobs", json=job_spec(name, tags), headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def call(api: Api, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body: dict[str, Any] = {}
    if path == "/api/v1/jobs" and method == "POST":
        body = {"json": job_spec("x")}
    elif path.endswith("/cancel"):
        body = {"json": {"tag": "*"}}
    elif path.endswith("/uploads"):
        body = {"content": b"bytes"}
    return api.client.request(method, path, headers=headers, **body)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    api = make_api(admin_key=ADMIN_KEY)
    api.register("stamp", STAMP, params={"name": {"type": "string"}})
    return api


def test_every_route_needs_a_valid_token(api: Api) -> None:
    job = submit(api, api.user("alice"), "a")
    dave = api.user("dave")
    api.cell.revoke_user("dave")
    cases = {"no token": ({}, "Authorization: Bearer"),
             "bad token": ({"Authorization": "Bearer jc_not-a-token"}, "unknown or revoked"),
             "revoked token": (dave, "unknown or revoked"),
             "wrong scheme": ({"Authorization": "Basic YWxpY2U6c2VjcmV0"},
                              "Authorization: Bearer")}
    for method, template in ROUTES:
        path = template.format(job=job)
        for what, (headers, detail) in cases.items():
            response = call(api, method, path, {**headers, "X-Admin-Key": ADMIN_KEY})
            assert detail in problem(response, 401), (what, method, path)
            assert response.headers["www-authenticate"] == "Bearer", (what, path)
    assert api.cell.status(job)["cancel_requested"] is False
    assert [j["job_id"] for j in api.cell.list()] == [job]


def test_another_users_job_is_not_found_on_every_route(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    job = submit(api, alice, "mine")
    api.run_worker()
    unknown = "00000000000-000000000000"
    for method, template in JOB_ROUTES:
        theirs = call(api, method, template.format(job=job), bob)
        made_up = call(api, method, template.format(job=unknown), bob)
        assert problem(theirs, 404) == problem(made_up, 404).replace(unknown, job), template
        assert call(api, method, template.format(job=job), alice).status_code == 200
    assert api.cell.status(job)["state"] == "succeeded"


def test_a_user_lists_only_their_own_jobs(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    mine = {submit(api, alice, "a1"), submit(api, alice, "a2")}
    theirs = submit(api, bob, "b1")
    listed = api.client.get("/api/v1/jobs", headers=alice).json()["jobs"]
    assert {j["job_id"] for j in listed} == mine
    assert {j["owner"] for j in listed} == {"alice"}
    bobs = api.client.get("/api/v1/jobs", headers=bob).json()["jobs"]
    assert [j["job_id"] for j in bobs] == [theirs]


def test_admin_routes_refuse_a_missing_or_wrong_key(api: Api) -> None:
    alice = api.user("alice")
    job = submit(api, alice, "a", tags=["t"])
    admin_routes = [(m, p) for m, p in ROUTES if "/admin/" in p]
    for method, template in admin_routes:
        path = template.format(job=job)
        assert "X-Admin-Key" in problem(call(api, method, path, alice), 403)
        wrong = {**alice, "X-Admin-Key": ADMIN_KEY[:-1] + "X"}
        assert "wrong" in problem(call(api, method, path, wrong), 403)
        longer = {**alice, "X-Admin-Key": ADMIN_KEY + "!"}
        assert "wrong" in problem(call(api, method, path, longer), 403)
        # The key alone is not enough: the admin is a signed-in user too.
        assert problem(call(api, method, path, {"X-Admin-Key": ADMIN_KEY}), 401)
    assert api.cell.status(job)["cancel_requested"] is False


def test_admin_routes_are_disabled_without_an_admin_key(make_api: Callable[..., Api]) -> None:
    api = make_api("no-admin")
    alice = {**api.user("alice"), "X-Admin-Key": ""}
    for method, template in [(m, p) for m, p in ROUTES if "/admin/" in p]:
        path = template.format(job="00000000000-000000000000")
        for key in ("", "anything"):
            detail = problem(call(api, method, path, {**alice, "X-Admin-Key": key}), 403)
            assert "disabled" in detail


def test_admin_lists_all_and_cancels_any_job_and_by_tag(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    admin = {**api.user("root"), "X-Admin-Key": ADMIN_KEY}
    a1 = submit(api, alice, "a1", tags=["batch-1"])
    b1 = submit(api, bob, "b1", tags=["batch-2"])
    b2 = submit(api, bob, "b2", tags=["other"])
    b3 = submit(api, bob, "b3")

    everything = api.client.get("/api/v1/admin/jobs", headers=admin).json()
    assert {j["job_id"] for j in everything["jobs"]} == {a1, b1, b2, b3}
    only_bob = api.client.get("/api/v1/admin/jobs", params={"owner": "bob", "limit": 2},
                              headers=admin).json()
    assert [j["job_id"] for j in only_bob["jobs"]] == [b3, b2]
    assert only_bob["next_offset"] == 2
    tagged = api.client.get("/api/v1/admin/jobs", params={"tag": "other"},
                            headers=admin).json()
    assert [j["job_id"] for j in tagged["jobs"]] == [b2]

    cancelled = api.client.delete(f"/api/v1/admin/jobs/{b3}", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["job_id"] == b3
    by_tag = api.client.post("/api/v1/admin/cancel", json={"tag": "batch-*"}, headers=admin)
    assert by_tag.status_code == 200
    assert by_tag.json() == {"tag": "batch-*", "job_ids": [a1, b1]}
    assert "tag" in problem(api.client.post("/api/v1/admin/cancel", json={"tag": ""},
                                            headers=admin), 422)
    assert "no job" in problem(api.client.delete("/api/v1/admin/jobs/nope", headers=admin),
                               404)
    api.run_worker()
    states = {j: api.cell.status(j)["state"] for j in (a1, b1, b2, b3)}
    assert states == {a1: "cancelled", b1: "cancelled", b2: "succeeded", b3: "cancelled"}
    again = api.client.post("/api/v1/admin/cancel", json={"tag": "batch-*"}, headers=admin)
    assert again.json()["job_ids"] == []
