"""Signed output downloads (tampering, expiry, ranges, headers) and input uploads."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import blake3
import httpx
import pytest

from conftest import Api
from jobcell.server.deps import file_path
from jobcell.server.files import content_disposition, plan_ranges

TEXT = "".join(f"{i:02d}" for i in range(50))      # 100 bytes: 000102...49
WRITE = ["write", "{output_dir}", "{name}", "{text}"]
WRITE_PARAMS = {"name": {"type": "string"}, "text": {"type": "string"}}


def problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return str(response.json()["detail"])


def run_write(api: Api, headers: dict[str, str], name: str = "report.txt",
              text: str = TEXT) -> str:
    spec = {"label": "files", "steps": [{"runner": "write",
                                         "params": {"name": name, "text": text}}]}
    response = api.client.post("/api/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 201, response.text
    api.run_worker()
    return str(response.json()["job_id"])


def href_of(api: Api, headers: dict[str, str], job: str, name: str = "report.txt") -> str:
    outputs = api.client.get(f"/api/v1/jobs/{job}/outputs", headers=headers).json()
    return str(next(o["href"] for o in outputs if o["name"] == name))


def with_query(href: str, **changes: str) -> str:
    parts = urlsplit(href)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    api = make_api(upload_max_mb=1)
    api.register("write", WRITE, params=WRITE_PARAMS)
    api.register("join", ["join", "{input_dir}", "{output_dir}"])
    return api


def test_outputs_download_through_their_signed_urls(api: Api) -> None:
    alice = api.user("alice")
    job = run_write(api, alice)
    listed = api.client.get(f"/api/v1/jobs/{job}/outputs", headers=alice).json()
    (entry,) = listed
    assert entry["size"] == 100 and entry["blake3"] == blake3.blake3(TEXT.encode()).hexdigest()
    for href in (entry["href"], api.client.get(f"/api/v1/jobs/{job}/result",
                                               headers=alice).json()["outputs"][0]["href"]):
        got = api.client.get(href)          # no bearer token: the URL is the credential
        assert got.status_code == 200 and got.text == TEXT
        assert got.headers["content-type"] == "text/plain; charset=utf-8"
        assert got.headers["content-disposition"] == (
            "attachment; filename=\"report.txt\"; filename*=UTF-8''report.txt")
        assert got.headers["accept-ranges"] == "bytes"
        assert got.headers["x-content-type-options"] == "nosniff"


def test_tampered_altered_and_expired_urls_are_refused(api: Api) -> None:
    alice = api.user("alice")
    job = run_write(api, alice)
    other = run_write(api, alice, name="other.txt")
    href = href_of(api, alice, job)
    sig = parse_qs(urlsplit(href).query)["sig"][0]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert "does not match" in problem(api.client.get(with_query(href, sig=flipped)), 403)
    later = str(int(parse_qs(urlsplit(href).query)["expires"][0]) + 1000)
    assert "does not match" in problem(api.client.get(with_query(href, expires=later)), 403)
    assert "not a number" in problem(api.client.get(with_query(href, expires="soon")), 403)
    moved = href.replace(f"/{job}/", f"/{other}/")
    assert "does not match" in problem(api.client.get(moved), 403)
    renamed = href.replace("/report.txt?", "/other.txt?")
    assert "does not match" in problem(api.client.get(renamed), 403)
    assert "not signed" in problem(api.client.get(href.split("?")[0]), 403)

    signer = api.app.state.jobcell.signer
    url, _ = signer.sign(file_path(job, "0-write", "report.txt"), now=time.time() - 7200)
    assert "expired" in problem(api.client.get(url), 403)
    fresh, _ = signer.sign(file_path(job, "0-write", "report.txt"))
    assert api.client.get(fresh).text == TEXT


def test_asking_again_issues_fresh_urls_after_old_ones_expire(make_api: Callable[..., Api]) -> None:
    api = make_api("short", download_url_ttl_s=1)
    api.register("write", WRITE, params=WRITE_PARAMS)
    alice = api.user("alice")
    job = run_write(api, alice)
    first = href_of(api, alice, job)
    assert api.client.get(first).status_code == 200
    expires = int(parse_qs(urlsplit(first).query)["expires"][0])
    time.sleep(max(0.0, expires - time.time()) + 1.05)
    assert "expired" in problem(api.client.get(first), 403)
    second = href_of(api, alice, job)
    assert second != first
    assert api.client.get(second).text == TEXT


def test_range_requests(api: Api) -> None:
    alice = api.user("alice")
    href = href_of(api, alice, run_write(api, alice))

    def get(range_: str, **headers: str) -> httpx.Response:
        return api.client.get(href, headers={"Range": range_, **headers})

    first = get("bytes=0-9")
    assert first.status_code == 206 and first.text == TEXT[:10]
    assert first.headers["content-range"] == "bytes 0-9/100"
    assert first.headers["content-length"] == "10"
    suffix = get("bytes=-5")
    assert suffix.status_code == 206 and suffix.text == TEXT[-5:]
    assert suffix.headers["content-range"] == "bytes 95-99/100"
    open_ended = get("bytes=10-")
    assert open_ended.status_code == 206 and open_ended.text == TEXT[10:]
    assert open_ended.headers["content-range"] == "bytes 10-99/100"
    past_end = get("bytes=90-500")
    assert past_end.status_code == 206 and past_end.text == TEXT[90:]
    unsatisfiable = get("bytes=100-200")
    assert "100 bytes" in problem(unsatisfiable, 416)
    assert unsatisfiable.headers["content-range"] == "bytes */100"
    assert get("bytes=-0").status_code == 416
    several = get("bytes=0-1, 4-5, 200-300")
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert "Content-Range: bytes 0-1/100" in several.text
    assert "Content-Range: bytes 4-5/100" in several.text
    for ignored in ("bytes=5-2", "items=0-5", "bytes=abc", "bytes=", "bytes=-"):
        whole = get(ignored)
        assert whole.status_code == 200 and whole.text == TEXT, ignored
    stale = get("bytes=0-9", **{"If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and stale.text == TEXT
    current = get("bytes=0-9", **{"If-Range": first.headers["etag"]})
    assert current.status_code == 206 and current.text == TEXT[:10]

    head = api.client.head(href)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "100"
    assert head.headers["content-disposition"].startswith("attachment;")
    head_range = api.client.head(href, headers={"Range": "bytes=0-9"})
    assert head_range.status_code == 206 and head_range.content == b""
    assert head_range.headers["content-range"] == "bytes 0-9/100"
    bad_head = api.client.head(with_query(href, sig="0" * 64))
    assert bad_head.status_code == 403


def test_plan_ranges_follows_rfc_9110() -> None:
    assert plan_ranges(None, 10) is None
    assert plan_ranges("bytes=0-0", 10) == [(0, 0)]
    assert plan_ranges("BYTES = 2-4 , -3", 10) == [(2, 4), (7, 9)]
    assert plan_ranges("bytes=-20", 10) == [(0, 9)]
    assert plan_ranges("bytes=10-", 10) == "unsatisfiable"
    assert plan_ranges("bytes=0-", 0) == "unsatisfiable"
    assert plan_ranges("bytes=-5", 0) == "unsatisfiable"
    assert plan_ranges("bytes=1" + "0" * 40 + "-", 10) is None
    assert plan_ranges("bytes=" + ",".join(["0-1"] * 101), 10) is None


def test_odd_file_names_download_with_safe_headers(api: Api) -> None:
    alice = api.user("alice")
    name = 'weird "name" é;.html'
    job = run_write(api, alice, name=name, text="<script>alert(1)</script>")
    got = api.client.get(href_of(api, alice, job, name))
    assert got.status_code == 200 and got.text == "<script>alert(1)</script>"
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"weird__name____.html\"; "
        "filename*=UTF-8''weird%20%22name%22%20%C3%A9%3B.html")
    assert "sandbox" in got.headers["content-security-policy"]
    assert content_disposition("sub/.hidden") == (
        "attachment; filename=\"hidden\"; filename*=UTF-8''.hidden")


def test_only_regular_files_inside_the_output_dir_are_served(api: Api, tmp_path: Path) -> None:
    alice = api.user("alice")
    job = run_write(api, alice)
    href = href_of(api, alice, job)
    (row,) = api.cell.outputs(job)
    secret = tmp_path / "secret.txt"
    secret.write_text("server secret")
    os.unlink(row["path"])
    os.symlink(secret, row["path"])
    assert "not served" in problem(api.client.get(href), 403)
    os.unlink(row["path"])
    assert "no output" in problem(api.client.get(href), 404)
    signer = api.app.state.jobcell.signer
    url, _ = signer.sign(file_path(job, "0-write", "unregistered.txt"))
    assert "no output" in problem(api.client.get(url), 404)
    url, _ = signer.sign(file_path("00000000000-000000000000", "0-write", "report.txt"))
    assert "no longer exists" in problem(api.client.get(url), 404)


# -- uploads -------------------------------------------------------------------------------

def upload(api: Api, headers: dict[str, str], content: Any) -> httpx.Response:
    return api.client.post("/api/v1/uploads", content=content,
                           headers={**headers, "Content-Type": "application/octet-stream"})


def join_job(files: dict[str, str], node: str = "join") -> dict[str, Any]:
    return {"label": "imaging", "pipeline": [{"id": node, "runner": "join", "files": files}]}


def test_an_uploaded_file_reaches_the_step_that_names_it(api: Api) -> None:
    alice = api.user("alice")
    data = bytes(range(256)) * 1000
    answer = upload(api, alice, data)
    assert answer.status_code == 201
    digest = blake3.blake3(data).hexdigest()
    assert answer.json() == {"digest": digest, "size": len(data)}
    streamed = upload(api, alice, (data[i:i + 7000] for i in range(0, len(data), 7000)))
    assert streamed.json() == answer.json()          # same bytes, same upload
    assert len(list(api.cell.home.uploads.glob("*/*"))) == 1

    job = api.client.post("/api/v1/jobs", json=join_job({"data/in.bin": digest}),
                          headers=alice).json()["job_id"]
    api.run_worker()
    status = api.client.get(f"/api/v1/jobs/{job}", headers=alice).json()
    assert status["state"] == "succeeded"
    assert status["steps"][0]["files"] == {"data/in.bin": digest}
    listing = api.client.get(href_of(api, alice, job, "listing.json")).json()
    assert listing["files"] == ["data/in.bin"]
    assert listing["manifest"]["files"]["data/in.bin"].endswith("/input/data/in.bin")


def test_another_users_upload_cannot_be_named(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    digest = upload(api, alice, b"alice's data").json()["digest"]
    refused = api.client.post("/api/v1/jobs", json=join_job({"in.bin": digest}), headers=bob)
    assert "not an upload of yours" in problem(refused, 400)
    unknown = api.client.post("/api/v1/jobs", json=join_job({"in.bin": "0" * 64}),
                              headers=alice)
    assert "not an upload of yours" in problem(unknown, 400)
    bad = api.client.post("/api/v1/jobs", json=join_job({"in.bin": "xyz"}), headers=alice)
    assert "BLAKE3" in problem(bad, 400)


def test_uploads_over_the_limit_are_refused_with_413(api: Api) -> None:
    alice = api.user("alice")
    too_big = b"x" * (1024 * 1024 + 1)
    assert "upload_max_mb" in problem(upload(api, alice, too_big), 413)
    chunks = (too_big[i:i + 65536] for i in range(0, len(too_big), 65536))
    assert "upload_max_mb" in problem(upload(api, alice, chunks), 413)   # no Content-Length
    assert [p for p in api.cell.home.uploads.rglob("*") if p.is_file()] == []
    assert upload(api, alice, too_big[:-1]).status_code == 201
    empty = upload(api, alice, b"")
    assert empty.status_code == 201 and empty.json()["size"] == 0


def test_different_upload_content_changes_the_step_key(api: Api) -> None:
    alice = api.user("alice")
    first = upload(api, alice, b"version one").json()["digest"]
    second = upload(api, alice, b"version two").json()["digest"]
    jobs = {}
    for node, digest in (("a", first), ("b", second), ("c", first)):
        jobs[node] = api.client.post("/api/v1/jobs", json=join_job({"in.bin": digest}, node),
                                     headers=alice).json()["job_id"]
        api.run_worker()
    keys = {n: api.cell.store.get_job(j).steps[0].step_key for n, j in jobs.items()}
    assert keys["a"] and keys["b"] and keys["a"] != keys["b"]
    states = {n: api.client.get(f"/api/v1/jobs/{j}", headers=alice).json()["steps"][0]["state"]
              for n, j in jobs.items()}
    assert states == {"a": "succeeded", "b": "succeeded", "c": "cached"}
    listing = json.loads(api.client.get(href_of(api, alice, jobs["c"], "listing.json")).text)
    assert listing["files"] == ["in.bin"]
