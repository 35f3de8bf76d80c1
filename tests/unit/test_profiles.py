"""Resource profiles: which one a step gets, and which definitions are refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from jobcell.errors import SpecError
from jobcell.model.profiles import apply_profile, choose_profile, profile_resources
from jobcell.model.spec import compile_spec

from .helpers import make_runner

PIXELS = {"pixels": {"type": "integer", "default": 10}}


def imaging(**fields: Any) -> Any:
    """A runner with a preview profile (small counts) and a full-resolution fallback."""
    data: dict[str, Any] = {
        "params": PIXELS, "resources": {"memory_mb": 50, "cpu_slots": 2},
        "profiles": [
            {"name": "preview", "count_param": "pixels", "max_count": 1000,
             "resources": {"memory_mb": 100}},
            {"name": "fullres", "resources": {"memory_mb": 300, "cpu_slots": 1}}]}
    data.update(fields)
    return make_runner("imaging", **data)


def by_bytes() -> Any:
    return make_runner("scan", profiles=[
        {"name": "small", "max_input_bytes": 1024, "resources": {"memory_mb": 64}},
        {"name": "large", "max_input_bytes": 10**9, "resources": {"memory_mb": 4096}}])


@pytest.mark.parametrize("pixels,expected", [(0, "preview"), (1000, "preview"),
                                             (1001, "fullres"), (10**9, "fullres")])
def test_chosen_by_a_count_param(pixels: int, expected: str) -> None:
    profile = choose_profile(imaging(), 0, {"pixels": pixels})
    assert profile is not None and profile.name == expected


@pytest.mark.parametrize("size,expected", [(0, "small"), (1024, "small"), (1025, "large"),
                                           (10**9, "large"), (10**9 + 1, None)])
def test_chosen_by_input_bytes(size: int, expected: str | None) -> None:
    profile = choose_profile(by_bytes(), size, {})
    assert (profile.name if profile else None) == expected


def test_a_missing_or_non_numeric_count_skips_the_threshold_profile() -> None:
    runner = imaging()
    for params in ({}, {"pixels": None}, {"pixels": True}, {"pixels": "5"}):
        profile = choose_profile(runner, 0, params)
        assert profile is not None and profile.name == "fullres", params


def test_both_thresholds_must_hold() -> None:
    runner = make_runner("both", params=PIXELS, profiles=[
        {"name": "tiny", "max_input_bytes": 100, "count_param": "pixels", "max_count": 10}])
    assert choose_profile(runner, 50, {"pixels": 5}).name == "tiny"   # type: ignore[union-attr]
    assert choose_profile(runner, 500, {"pixels": 5}) is None
    assert choose_profile(runner, 50, {"pixels": 50}) is None


def test_without_profiles_or_a_match_the_runner_resources_stay() -> None:
    plain = make_runner("plain", resources={"memory_mb": 77})
    assert choose_profile(plain, 10**12, {}) is None
    assert apply_profile(plain, 0, {}) == (plain, None)
    assert profile_resources(plain, None).memory_mb == 77


def test_applied_profile_overrides_only_what_it_names() -> None:
    runner = imaging()
    preview, name = apply_profile(runner, 0, {"pixels": 5})
    assert name == "preview"
    assert (preview.resources.memory_mb, preview.resources.cpu_slots) == (100, 2)
    fullres, name = apply_profile(runner, 0, {"pixels": 5000})
    assert name == "fullres"
    assert (fullres.resources.memory_mb, fullres.resources.cpu_slots) == (300, 1)
    assert fullres.resources.timeout_s == runner.resources.timeout_s


def test_compile_records_the_profile_and_keeps_the_cache_identity() -> None:
    runners = {"imaging": imaging()}

    def compiled(pixels: int) -> Any:
        return compile_spec({"label": "l", "steps": [{"runner": "imaging",
                                                      "params": {"pixels": pixels}}]},
                            runners).steps[0]

    small, large = compiled(10), compiled(10**6)
    assert (small.profile, small.resources.memory_mb) == ("preview", 100)
    assert (large.profile, large.resources.memory_mb) == ("fullres", 300)
    # Provisioning is not what a step computes: the runner's cache identity is the same.
    assert small.runner.cache_hash() == large.runner.cache_hash() == \
        runners["imaging"].cache_hash()


def test_compile_sums_the_bytes_of_a_steps_uploads() -> None:
    digests = {"a" * 64: 600, "b" * 64: 600}
    spec = {"label": "l", "steps": [{"runner": "scan", "files": {
        "one.bin": "a" * 64, "two.bin": "b" * 64}}]}
    step = compile_spec(spec, {"scan": by_bytes()}, upload_size=digests.get).steps[0]
    assert step.profile == "large"                        # 1200 bytes > 1024
    with pytest.raises(SpecError, match="not an upload of yours"):
        compile_spec(spec, {"scan": by_bytes()}, upload_size=lambda _: None)


@pytest.mark.parametrize("profiles,params,problem", [
    ([{"name": "p", "count_param": "pixels", "max_count": 5}], {},
     "count_param 'pixels' must name an integer or number param"),
    ([{"name": "p", "count_param": "label", "max_count": 5}], {"label": {"type": "string"}},
     "must name an integer or number param"),
    ([{"name": "p"}, {"name": "p"}], {}, "profile 'p' is declared twice"),
    ([{"name": "p", "count_param": "pixels"}], PIXELS,
     "'count_param' and 'max_count' go together"),
    ([{"name": "p", "max_count": 5}], PIXELS, "'count_param' and 'max_count' go together"),
    ([{"name": "../p"}], {}, "profile name"),
    ([{"name": "p", "max_input_bytes": -1}], {}, "greater than or equal to 0"),
    ([{"name": "p", "resources": {"memory_mb": -5}}], {}, "greater than or equal to 0"),
    ([{"name": "p", "resources": {"disk": 5}}], {}, "Extra inputs are not permitted"),
    ([{"name": "p", "bogus": 1}], {}, "Extra inputs are not permitted"),
])
def test_invalid_profiles_are_refused(profiles: list[dict[str, Any]], params: dict[str, Any],
                                      problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        make_runner("bad", params=params, profiles=profiles)


def test_a_number_param_may_be_a_count() -> None:
    runner = make_runner("ok", params={"area": {"type": "number"}}, profiles=[
        {"name": "small", "count_param": "area", "max_count": 2.5}])
    assert choose_profile(runner, 0, {"area": 2.5}).name == "small"   # type: ignore[union-attr]
    assert choose_profile(runner, 0, {"area": 2.6}) is None
