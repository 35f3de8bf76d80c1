"""Capacity detection: options override, ``auto`` measures the host."""

from __future__ import annotations

import os

import psutil
import pytest

from jobcell.scheduler import capacity as capacity_module
from jobcell.scheduler.capacity import detect_capacity, host_cpu_count, host_memory_mb


def test_numbers_override_detection() -> None:
    found = detect_capacity(3, 8192, 2048)
    assert (found.cpu_slots, found.memory_mb) == (3, 6144)
    assert found.cpu_source == "option cpu_slots"
    assert found.memory_source == "option node_memory_mb minus reserve 2048 MB"


def test_auto_cpu_uses_the_affinity_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_capacity("auto", 1000, 0).cpu_slots == len(os.sched_getaffinity(0))
    monkeypatch.setattr(capacity_module.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    found = detect_capacity("auto", 1000, 0)
    assert found.cpu_slots == 3
    assert found.cpu_source == "cpu affinity"


def test_auto_cpu_falls_back_to_the_host_count(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(pid: int) -> set[int]:
        raise OSError("no affinity here")

    monkeypatch.setattr(capacity_module.os, "sched_getaffinity", unavailable)
    monkeypatch.setattr(capacity_module.os, "cpu_count", lambda: 6)
    assert host_cpu_count() == (6, "host cpu count")
    monkeypatch.setattr(capacity_module.os, "cpu_count", lambda: None)
    assert host_cpu_count() == (1, "host cpu count")


def test_auto_memory_is_host_memory_minus_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    real = psutil.virtual_memory().total // (1024 * 1024)
    assert host_memory_mb() == real
    assert detect_capacity(1, "auto", 512).memory_mb == max(real - 512, 0)
    monkeypatch.setattr(capacity_module, "host_memory_mb", lambda: 16_000)
    found = detect_capacity(1, "auto", 2048)
    assert found.memory_mb == 13_952
    assert found.memory_source == "host memory minus reserve 2048 MB"


def test_reserve_larger_than_memory_leaves_zero_not_negative() -> None:
    assert detect_capacity(1, 1000, 4096).memory_mb == 0
