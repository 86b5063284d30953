"""Decode concurrency from the container's memory: cgroup v2 and v1 files and /proc/meminfo,
written under ``tmp_path`` as the kernel lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from app.preprocess.memory import (
    DECODE_PEAK_FACTOR,
    HEADROOM_BYTES,
    decode_concurrency,
    per_decode_bytes,
    read_budget,
)

GIB = 1024**3
MIB = 1024**2
CAP = 512 * MIB  # the default MEDINFER_DICOM_MAX_PIXEL_BYTES
PER_DECODE = int(CAP * DECODE_PEAK_FACTOR)


def settings(**values: object) -> Settings:
    return Settings.model_validate({"env": "test", **values})


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """A /proc with 64 GiB available on the node and the process at the cgroup v2 root."""
    root = tmp_path / "proc"
    write(root / "meminfo", f"MemTotal:       99999999 kB\nMemAvailable:   {64 * GIB // 1024} kB\n")
    write(root / "self" / "cgroup", "0::/\n")
    return root


def test_a_cgroup_v2_limit_bounds_the_slots_not_the_node_cpu_count(tmp_path: Path, proc: Path) -> None:
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{8 * GIB}\n")
    write(cgroup / "memory.current", f"{1 * GIB}\n")
    slots = decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=64)
    assert slots == (7 * GIB - HEADROOM_BYTES) // PER_DECODE
    assert slots == 2


def test_the_process_own_cgroup_and_its_tightest_ancestor_are_read(tmp_path: Path, proc: Path) -> None:
    write(proc / "self" / "cgroup", "0::/kubepods/pod1/ctr\n")
    cgroup = tmp_path / "cgroup"
    write(cgroup / "kubepods" / "pod1" / "ctr" / "memory.max", "max\n")
    write(cgroup / "kubepods" / "pod1" / "ctr" / "memory.current", f"{GIB}\n")
    write(cgroup / "kubepods" / "pod1" / "memory.max", f"{4 * GIB}\n")
    write(cgroup / "kubepods" / "pod1" / "memory.current", f"{GIB}\n")
    write(cgroup / "memory.max", "max\n")
    assert read_budget(cgroup, proc).cgroup_free == 3 * GIB
    assert decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=16) == 1


def test_cgroup_v1_limit_is_read_and_its_unlimited_value_ignored(tmp_path: Path, proc: Path) -> None:
    write(proc / "self" / "cgroup", "4:memory:/docker/abc\n0::/\n")
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(cgroup / "memory" / "docker" / "abc" / "memory.limit_in_bytes", f"{16 * GIB}\n")
    write(cgroup / "memory" / "docker" / "abc" / "memory.usage_in_bytes", f"{GIB}\n")
    assert decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=32) == (
        (15 * GIB - HEADROOM_BYTES) // PER_DECODE
    )


def test_without_a_cgroup_limit_meminfo_decides(tmp_path: Path, proc: Path) -> None:
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", "max\n")
    write(proc / "meminfo", f"MemAvailable:   {6 * GIB // 1024} kB\n")
    assert decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=8) == 2


def test_the_node_being_short_of_memory_wins_over_a_generous_limit(tmp_path: Path, proc: Path) -> None:
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{64 * GIB}\n")
    write(cgroup / "memory.current", "0\n")
    write(proc / "meminfo", f"MemAvailable:   {3 * GIB // 1024} kB\n")
    assert decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=8) == 1


def test_never_more_than_the_cpus_never_less_than_one(tmp_path: Path, proc: Path) -> None:
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{1024 * GIB}\n")
    write(cgroup / "memory.current", "0\n")
    assert decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=4) == 4
    write(cgroup / "memory.current", f"{1024 * GIB}\n")  # at its limit already
    assert decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=4) == 1


def test_a_smaller_pixel_cap_allows_more_decodes(tmp_path: Path, proc: Path) -> None:
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{8 * GIB}\n")
    write(cgroup / "memory.current", "0\n")
    small = settings(dicom_max_pixel_bytes=64 * MIB)
    assert per_decode_bytes(64 * MIB) == 320 * MIB
    assert decode_concurrency(small, cgroup_root=cgroup, proc_root=proc, cpus=64) == (
        (8 * GIB - HEADROOM_BYTES) // (320 * MIB)
    )


def test_the_setting_overrides_what_memory_would_allow(tmp_path: Path, proc: Path) -> None:
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{2 * GIB}\n")
    assert decode_concurrency(settings(decode_concurrency=3), cgroup_root=cgroup, proc_root=proc, cpus=1) == 3


def test_unreadable_or_missing_files_fall_back_to_the_cpus(tmp_path: Path) -> None:
    assert decode_concurrency(settings(), cgroup_root=tmp_path / "none", proc_root=tmp_path / "none", cpus=3) == 3
    write(tmp_path / "proc" / "meminfo", "MemAvailable: lots\n")
    write(tmp_path / "proc" / "self" / "cgroup", "garbage\n")
    write(tmp_path / "cgroup" / "memory.max", "-1\n")
    assert read_budget(tmp_path / "cgroup", tmp_path / "proc").free is None


def test_this_machine_gives_a_sane_answer() -> None:
    assert decode_concurrency(settings()) >= 1


def test_workers_of_one_container_share_its_memory(tmp_path: Path, proc: Path) -> None:
    """Each uvicorn worker is a process with its own slots; together they must fit the limit."""
    cgroup = tmp_path / "cgroup"
    write(cgroup / "memory.max", f"{17 * GIB}\n")
    write(cgroup / "memory.current", f"{1 * GIB}\n")
    alone = decode_concurrency(settings(), cgroup_root=cgroup, proc_root=proc, cpus=64)
    per_worker = decode_concurrency(settings(workers=4), cgroup_root=cgroup, proc_root=proc, cpus=64)
    assert alone == (16 * GIB - HEADROOM_BYTES) // PER_DECODE == 6
    assert per_worker == (4 * GIB - HEADROOM_BYTES) // PER_DECODE == 1
    assert 4 * (per_worker * PER_DECODE + HEADROOM_BYTES) <= 16 * GIB
