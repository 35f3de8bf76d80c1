"""The served OpenAPI document is complete and true: every /api/v1 route with its response
schema and problem responses, and schemathesis finds no 5xx and no schema violations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Api
from jobcell.server import api as rest_api
from jobcell.server import files

Served = tuple[Api, dict[str, str]]     # the server and headers with token and admin key
ADMIN_KEY = "openapi-admin-key"
PROBLEM_REF = "#/components/schemas/Problem"
EXAMPLES = 30
VALID_SPEC = {"label": "fuzz", "steps": [{"runner": "stamp", "params": {"name": "y"}}]}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture
def served(make_api: Callable[..., Api]) -> Served:
    """A server with a runner, a user with one finished job, and the admin key set."""
    api = make_api(admin_key=ADMIN_KEY, upload_max_mb=1)
    api.register("stamp", ["stamp", "{output_dir}", "{name}", "0"],
                 params={"name": {"type": "string", "maxLength": 20}})
    headers = {**api.user("fuzzer"), "X-Admin-Key": ADMIN_KEY}
    spec = {"label": "openapi", "steps": [{"runner": "stamp", "params": {"name": "x"}}]}
    assert api.client.post("/api/v1/jobs", json=spec, headers=headers).status_code == 201
    api.run_worker()
    return api, headers


def api_operations() -> set[tuple[str, str]]:
    """Every method and path the REST API and the download route serve."""
    routes = [*rest_api.router.routes, *files.router.routes]
    return {(method.lower(), route.path) for route in routes
            if isinstance(route, APIRoute) for method in route.methods}


def test_openapi_lists_every_route_with_schemas_and_problems(served: Served) -> None:
    api, _ = served
    document = api.client.get("/openapi.json")
    assert document.status_code == 200
    spec = document.json()
    assert "Problem" in spec["components"]["schemas"]
    documented = {(method, path.replace("{name}", "{name:path}")
                   if path.startswith("/api/v1/files/") else path)
                  for path, ops in spec["paths"].items() for method in ops}
    expected = api_operations()
    assert len(expected) >= 19
    assert expected <= documented
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary") and op.get("description"), where
            responses = op["responses"]
            success = [code for code in responses if code.startswith("2")]
            assert success, where
            errors = [code for code in responses if code[0] in "45"]
            assert errors, where
            for code in errors:
                content = responses[code]["content"]
                assert content["application/problem+json"]["schema"] == {"$ref": PROBLEM_REF}, \
                    f"{where} {code}"
            if path.startswith("/api/v1/files/"):
                assert "security" not in op and {"403", "416"} <= set(responses)
                assert "credential" in op["description"]
                continue
            assert "401" in responses, where
            assert any(s.get("HTTPBearer") == [] for s in op["security"]), where
            schema = responses[success[0]]["content"]["application/json"]["schema"]
            assert "$ref" in schema or schema.get("type") == "array", where
            if "/admin/" in path:
                assert "403" in responses, where
    submit = spec["paths"]["/api/v1/jobs"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["label"] and "pipeline" in body["properties"]
    assert "413" in submit["responses"]
    upload = spec["paths"]["/api/v1/uploads"]["post"]["requestBody"]["content"]
    assert upload["application/octet-stream"]["schema"]["format"] == "binary"


def test_the_file_route_is_documented_and_behaves(served: Served) -> None:
    """The download route is left out of the fuzzing below: exercise it by its schema."""
    api, headers = served
    (job,) = [j["job_id"] for j in api.cell.list()]
    outputs = api.client.get(f"/api/v1/jobs/{job}/outputs", headers=headers).json()
    assert outputs
    for entry in outputs:
        got = api.client.get(entry["href"])
        assert got.status_code == 200 and len(got.content) == entry["size"]
        assert api.client.get(entry["href"] + "x").status_code == 403


def fuzz_plans(operations: list[Any], job: str) -> list[tuple[Any, GenerationMode, dict]]:
    """Positive and negative cases for each operation, plus positive cases aimed at a real
    job, a real runner and a valid spec so that success answers are checked too."""
    plans: list[tuple[Any, GenerationMode, dict]] = []
    for operation in operations:
        plans += [(operation, mode, {}) for mode in GenerationMode]
        if "{job_id}" in operation.path:
            plans.append((operation, GenerationMode.POSITIVE,
                          {"path_parameters": {"job_id": job}}))
        if operation.path == "/api/v1/runners/{name}":
            plans.append((operation, GenerationMode.POSITIVE,
                          {"path_parameters": {"name": "stamp"}}))
        if operation.label == "POST /api/v1/jobs":
            plans.append((operation, GenerationMode.POSITIVE, {"body": VALID_SPEC}))
    return plans


def test_fuzzing_finds_no_server_errors_or_schema_violations(served: Served) -> None:
    """Every /api/v1 operation except the download route (tested above), sent with a
    valid token and admin key: no 5xx, no undocumented status, no schema violation."""
    api, headers = served
    (job,) = [j["job_id"] for j in api.cell.list()]
    loaded = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    subset = loaded.include(path_regex=r"^/api/v1/").exclude(path_regex=r"^/api/v1/files/")
    operations = [result.ok() for result in subset.get_all_operations()]
    assert len(operations) >= 17
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    for operation, mode, fixed in fuzz_plans(operations, job):

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            seen.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            check()
        except Exception as exc:  # collect every operation's failures, then report them all
            failures.append(f"{operation.label} ({mode.value}, {fixed}): {exc}")
    assert not failures, "\n\n".join(failures)
    for label, status in [("POST /api/v1/jobs", 201), ("POST /api/v1/uploads", 201),
                          ("GET /api/v1/jobs/{job_id}", 200),
                          ("GET /api/v1/jobs/{job_id}/result", 200),
                          ("GET /api/v1/runners/{name}", 200), ("GET /api/v1/scheduler", 200),
                          ("POST /api/v1/admin/cancel", 200)]:
        assert status in seen[label], (label, seen[label])
