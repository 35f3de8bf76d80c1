"""GPU capacity: a fake nvidia-smi on PATH, the visible-devices variables, ``gpu_count``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobcell.errors import ConfigError
from jobcell.scheduler.capacity import Capacity, detect_capacity
from jobcell.scheduler.gpus import (
    GpuDevice,
    parse_gpu_table,
    parse_uuid_table,
    resolve_entry,
    visible_entries,
)
from jobcell.settings import OPTIONS, load_settings

from .fake_trees import UUID_TABLE, fake_nvidia_smi

H100 = GpuDevice("0", 81559, "NVIDIA H100 80GB HBM3")
A100 = GpuDevice("1", 40960, "NVIDIA A100-PCIE-40GB")
UUID_1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH directory holding the fake nvidia-smi (two GPUs)."""
    fake_nvidia_smi(tmp_path / "bin")
    return tmp_path / "bin"


def gpus(bin_dir: Path, gpu_count: int | str = "auto", **env: str) -> Capacity:
    """Capacity with fixed CPU/memory and GPUs detected with ``env`` (PATH = bin_dir)."""
    return detect_capacity(1, 1000, 0, gpu_count, root=bin_dir,
                           env={"PATH": str(bin_dir), **env})


def calls(bin_dir: Path) -> list[str]:
    log = bin_dir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_two_gpus_are_detected(bin_dir: Path) -> None:
    found = gpus(bin_dir)
    assert found.gpus == (H100, A100)
    assert (found.gpu_count, found.gpu_source) == (2, "nvidia-smi (2 GPUs)")
    assert calls(bin_dir) == ["--query-gpu=index,memory.total,name "
                              "--format=csv,noheader,nounits"]
    assert found.to_dict()["gpus"][1] == {"index": "1", "memory_mb": 40960,
                                          "name": "NVIDIA A100-PCIE-40GB"}


def test_cuda_visible_devices_narrows_by_index(bin_dir: Path) -> None:
    found = gpus(bin_dir, CUDA_VISIBLE_DEVICES="1")
    assert found.gpus == (A100,)
    assert found.gpu_source == "nvidia-smi (2 GPUs), 1 visible by CUDA_VISIBLE_DEVICES=1"


def test_the_listed_order_is_kept_and_unknown_indices_ignored(bin_dir: Path) -> None:
    assert gpus(bin_dir, CUDA_VISIBLE_DEVICES="1,7,0,1").gpus == (A100, H100)


def test_nvidia_visible_devices_narrows_too(bin_dir: Path) -> None:
    found = gpus(bin_dir, NVIDIA_VISIBLE_DEVICES="0")
    assert found.gpus == (H100,)
    assert found.gpu_source.endswith("1 visible by NVIDIA_VISIBLE_DEVICES=0")


def test_cuda_visible_devices_takes_precedence(bin_dir: Path) -> None:
    found = gpus(bin_dir, CUDA_VISIBLE_DEVICES="1", NVIDIA_VISIBLE_DEVICES="0")
    assert found.gpus == (A100,)


def test_nvidia_indices_matching_nothing_keep_all(bin_dir: Path) -> None:
    # In a container the runtime already renumbered the devices nvidia-smi shows.
    found = gpus(bin_dir, NVIDIA_VISIBLE_DEVICES="5")
    assert found.gpus == (H100, A100)
    assert "matches none of them, kept all" in found.gpu_source


@pytest.mark.parametrize("value", ["", "-1", "none", "void", "NoDevFiles"])
def test_values_meaning_no_device(bin_dir: Path, value: str) -> None:
    found = gpus(bin_dir, CUDA_VISIBLE_DEVICES=value)
    assert found.gpus == ()
    assert found.gpu_source == f"nvidia-smi (2 GPUs), 0 visible by CUDA_VISIBLE_DEVICES={value}"


def test_all_means_every_device(bin_dir: Path) -> None:
    assert gpus(bin_dir, NVIDIA_VISIBLE_DEVICES="all").gpu_count == 2


def test_uuids_are_mapped_with_a_second_query(bin_dir: Path) -> None:
    found = gpus(bin_dir, CUDA_VISIBLE_DEVICES=f"{UUID_1},0")
    assert found.gpus == (A100, H100)
    assert calls(bin_dir)[1] == "--query-gpu=index,uuid --format=csv,noheader"


def test_a_uuid_prefix_and_an_old_style_mig_id_name_their_gpu(bin_dir: Path) -> None:
    assert gpus(bin_dir, CUDA_VISIBLE_DEVICES="GPU-aaaa").gpus == (A100,)
    mig = "MIG-GPU-11111111-2222-3333-4444-555555555555/1/0"
    assert gpus(bin_dir, CUDA_VISIBLE_DEVICES=mig).gpus == (H100,)


def test_an_unmappable_mig_device_keeps_all(bin_dir: Path) -> None:
    found = gpus(bin_dir, CUDA_VISIBLE_DEVICES="MIG-0a1b2c3d-0000-1111-2222-333333333333")
    assert found.gpu_count == 2
    assert "not applied: cannot map MIG-0a1b2c3d" in found.gpu_source


def test_a_failing_uuid_query_keeps_all_and_says_so(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, uuids=None)
    found = gpus(bin_dir, CUDA_VISIBLE_DEVICES=UUID_1)
    assert found.gpus == (H100, A100)
    assert found.gpu_source == (
        f"nvidia-smi (2 GPUs); CUDA_VISIBLE_DEVICES={UUID_1} not applied: cannot map UUIDs "
        "(nvidia-smi failed (exit 3): uuid query unsupported)")


def test_a_failing_nvidia_smi_means_no_gpus_and_says_why(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, exit_code=9, message="NVIDIA-SMI has failed: no driver")
    found = gpus(bin_dir)
    assert found.gpus == ()
    assert found.gpu_source == "nvidia-smi failed (exit 9): NVIDIA-SMI has failed: no driver"


def test_unparseable_output_means_no_gpus(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, gpus="No devices were found\n")
    found = gpus(bin_dir)
    assert found.gpus == ()
    assert found.gpu_source.startswith("nvidia-smi output not understood: ")


def test_absent_nvidia_smi(tmp_path: Path) -> None:
    found = gpus(tmp_path)
    assert (found.gpus, found.gpu_source) == ((), "nvidia-smi not found")


def test_gpu_count_takes_the_first_devices(bin_dir: Path) -> None:
    found = gpus(bin_dir, gpu_count=1)
    assert found.gpus == (H100,)
    assert found.gpu_source == "option gpu_count (first 1 of nvidia-smi (2 GPUs))"


def test_gpu_count_declares_devices_nvidia_smi_cannot_see(tmp_path: Path) -> None:
    found = gpus(tmp_path, gpu_count=3)
    assert [gpu.index for gpu in found.gpus] == ["0", "1", "2"]
    assert {(gpu.memory_mb, gpu.name) for gpu in found.gpus} == {(None, "declared by gpu_count")}
    assert found.gpu_source == "option gpu_count (declared 3; nvidia-smi not found)"


def test_gpu_count_zero_means_none_without_running_nvidia_smi(bin_dir: Path) -> None:
    found = gpus(bin_dir, gpu_count=0)
    assert (found.gpus, found.gpu_source) == ((), "option gpu_count (0)")
    assert calls(bin_dir) == []


def test_detection_can_be_skipped_unless_a_count_is_given(bin_dir: Path) -> None:
    env = {"PATH": str(bin_dir)}
    skipped = detect_capacity(1, 1000, 0, root=bin_dir, env=env, detect_gpus=False)
    assert (skipped.gpus, skipped.gpu_source) == ((), "not detected")
    assert calls(bin_dir) == []
    counted = detect_capacity(1, 1000, 0, 2, root=bin_dir, env=env, detect_gpus=False)
    assert counted.gpus == (H100, A100)


def test_an_explicit_nvidia_smi_path(bin_dir: Path) -> None:
    found = detect_capacity(1, 1000, 0, root=bin_dir, env={"PATH": ""},
                            nvidia_smi=str(bin_dir / "nvidia-smi"))
    assert found.gpu_count == 2


# --- the pure parsers --------------------------------------------------------------------

def test_parse_gpu_table_handles_na_memory_and_commas_in_names() -> None:
    assert parse_gpu_table("0, [N/A], Odd, Name\n\n") == (GpuDevice("0", None, "Odd, Name"),)
    with pytest.raises(ValueError):
        parse_gpu_table("GPU 0: something\n")


def test_parse_uuid_table() -> None:
    assert parse_uuid_table(UUID_TABLE)[UUID_1] == "1"
    with pytest.raises(ValueError):
        parse_uuid_table("0\n")


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("all", None), (" ALL ", None), ("", []), ("-1", []), ("void", []),
    ("0, 2", ["0", "2"]), ("GPU-x,", ["GPU-x"]),
])
def test_visible_entries(value: str | None, expected: list[str] | None) -> None:
    assert visible_entries(value) == expected


def test_an_ambiguous_uuid_prefix_names_nothing() -> None:
    assert resolve_entry("GPU-", {"GPU-a": "0", "GPU-b": "1"}) is None


# --- the gpu_count option ----------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [("auto", "auto"), (" Auto ", "auto"),
                                               ("2", 2), (0, 0), (3.0, 3)])
def test_gpu_count_option_parses(raw: Any, expected: int | str) -> None:
    assert load_settings(None, env={}, overrides={"gpu_count": raw}).gpu_count == expected
    assert load_settings(None, env={}).gpu_count == "auto"


@pytest.mark.parametrize("raw", [-1, "x", "-1", 1.5, True])
def test_gpu_count_option_rejects(raw: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={}, overrides={"gpu_count": raw})
    assert str(info.value) == (f"override: option 'gpu_count' expects "
                               f"{OPTIONS['gpu_count'].expects}, got {raw!r}")
    assert OPTIONS["gpu_count"].expects == "a non-negative integer or 'auto'"


def test_gpu_count_from_the_environment_names_the_variable() -> None:
    assert load_settings(None, env={"JOBCELL_GPU_COUNT": "2"}).gpu_count == 2
    with pytest.raises(ConfigError, match="JOBCELL_GPU_COUNT: option 'gpu_count'"):
        load_settings(None, env={"JOBCELL_GPU_COUNT": "-1"})
