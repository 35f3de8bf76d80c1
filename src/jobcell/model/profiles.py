"""Resource profiles: which of a runner's profiles a step gets, from its input size.

Pure: the caller gives the total bytes of the step's uploaded files and its params.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobcell.model.runner import ResourceProfile, Resources, RunnerDefinition


def profile_applies(profile: ResourceProfile, input_bytes: int,
                    params: Mapping[str, Any]) -> bool:
    """Whether every threshold the profile declares holds (none declared: it applies)."""
    if profile.max_input_bytes is not None and input_bytes > profile.max_input_bytes:
        return False
    if profile.count_param is not None and profile.max_count is not None:
        count = params.get(profile.count_param)
        if isinstance(count, bool) or not isinstance(count, (int, float)):
            return False  # no count given: a threshold on it cannot be said to hold
        if count > profile.max_count:
            return False
    return True


def choose_profile(runner: RunnerDefinition, input_bytes: int,
                   params: Mapping[str, Any]) -> ResourceProfile | None:
    """The first of the runner's profiles that applies, or None (the runner's resources)."""
    for profile in runner.profiles:
        if profile_applies(profile, input_bytes, params):
            return profile
    return None


def profile_resources(runner: RunnerDefinition, profile: ResourceProfile | None) -> Resources:
    """The runner's resources with the profile's changes."""
    if profile is None:
        return runner.resources
    return Resources(**{**runner.resources.model_dump(),
                        **profile.resources.model_dump(exclude_none=True)})


def apply_profile(runner: RunnerDefinition, input_bytes: int,
                  params: Mapping[str, Any]) -> tuple[RunnerDefinition, str | None]:
    """The runner as the step runs it (the chosen profile's resources) and the profile name."""
    profile = choose_profile(runner, input_bytes, params)
    if profile is None:
        return runner, None
    return runner.model_copy(update={"resources": profile_resources(runner, profile)}), \
        profile.name
