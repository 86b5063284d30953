"""How many images may be decoded at once: as many as the container's memory holds.

One decode at the pixel cap (``MEDINFER_DICOM_MAX_PIXEL_BYTES``, 512 MiB by default) is the
largest allocation the service makes, and ``os.cpu_count()`` inside a container is the node's
count, not the container's share. So the number of decode slots is the memory the process may
still use, less a headroom, divided by the peak cost of one decode at the cap, and never more
than the CPUs the process may run on.

The memory the process may still use is the smallest of what is known:

* cgroup v2: ``memory.max - memory.current`` of the process's cgroup (``/proc/self/cgroup``,
  ``0::/path``) and of each of its ancestors up to the root (the root alone is what a container
  with its own cgroup namespace sees);
* cgroup v1, where no v2 limit is found: ``memory.limit_in_bytes - memory.usage_in_bytes`` of the
  memory controller's cgroup (``N:memory:/path``) and its ancestors;
* ``MemAvailable`` in ``/proc/meminfo`` (the host's, or the node's).

A limit of ``max`` (v2) or one near 2**63 (v1, "unlimited") is no limit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from app.config import Settings

log = logging.getLogger(__name__)

#: Peak memory added by one :func:`app.preprocess.pixels.to_tensor`, in multiples of the decoded
#: pixel buffer (Rows x Columns x BitsAllocated/8). Measured with the real decoder on synthetic
#: 16-bit images (64 MiB uncompressed, 16 MiB RLE): 2.05 uncompressed with a linear window (the
#: stored values are a view; Pillow's float image is twice their size), 4.05 when the window
#: clips (a float copy and the float image), 4.0 to 5.1 for compressed data (the decoded array
#: comes on top). The worst case is the one that must fit.
DECODE_PEAK_FACTOR: Final = 5.0
#: Kept free for the rest of the process (models, batches, parsing, the Python heap).
HEADROOM_BYTES: Final = 512 * 1024 * 1024
#: cgroup v1 reports "no limit" as a number near 2**63, rounded down to a page.
_V1_UNLIMITED: Final = 1 << 60
DEFAULT_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
DEFAULT_PROC_ROOT: Final = Path("/proc")


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """What is known of the memory the process may still use, in bytes (None: not known)."""

    cgroup_free: int | None
    meminfo_available: int | None

    @property
    def free(self) -> int | None:
        known = [value for value in (self.cgroup_free, self.meminfo_available) if value is not None]
        return min(known) if known else None


def decode_concurrency(
    settings: Settings,
    *,
    cgroup_root: Path = DEFAULT_CGROUP_ROOT,
    proc_root: Path = DEFAULT_PROC_ROOT,
    cpus: int | None = None,
) -> int:
    """Decode slots for this process: ``settings.decode_concurrency`` if set, else derived from
    memory (see the module docstring). Always at least 1."""
    if settings.decode_concurrency is not None:
        return settings.decode_concurrency
    cpus = cpus if cpus is not None else available_cpus()
    budget = read_budget(cgroup_root, proc_root)
    # Every uvicorn worker is a process of the same container, each with its own slots: share.
    free = None if budget.free is None else budget.free // max(1, settings.workers)
    slots = decode_slots(
        free, per_decode_bytes(settings.dicom_max_pixel_bytes), max(1, cpus // max(1, settings.workers))
    )
    log.info(
        "decode concurrency derived",
        extra={
            "event": "decode.concurrency",
            "slots": slots,
            "cpus": cpus,
            "free_bytes": budget.free,
            "workers": settings.workers,
            "per_decode_bytes": per_decode_bytes(settings.dicom_max_pixel_bytes),
        },
    )
    return slots


def per_decode_bytes(max_pixel_bytes: int) -> int:
    return int(max_pixel_bytes * DECODE_PEAK_FACTOR)


def decode_slots(free_bytes: int | None, per_decode: int, cpus: int) -> int:
    """``(free - headroom) // per_decode``, between 1 and ``cpus``; ``cpus`` when memory is unknown."""
    cpus = max(1, cpus)
    if free_bytes is None:
        return cpus
    return max(1, min(cpus, (free_bytes - HEADROOM_BYTES) // max(1, per_decode)))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one), at most ``os.cpu_count()``."""
    count = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    return max(1, count)


def read_budget(cgroup_root: Path = DEFAULT_CGROUP_ROOT, proc_root: Path = DEFAULT_PROC_ROOT) -> MemoryBudget:
    return MemoryBudget(cgroup_free=_cgroup_free(cgroup_root, proc_root), meminfo_available=_meminfo(proc_root))


def _cgroup_free(root: Path, proc_root: Path) -> int | None:
    """The tightest ``limit - usage`` over the process's cgroup and its ancestors (a pod's limit
    may sit a level above the container's): v2 files first, then the v1 memory controller's."""
    v2_path, v1_path = _own_cgroups(proc_root)
    free: int | None = None
    for directory in _ancestry(root, v2_path):
        free = _tighter(free, _free(directory / "memory.max", directory / "memory.current"))
    if free is None:
        for directory in _ancestry(root / "memory", v1_path):
            free = _tighter(free, _free(directory / "memory.limit_in_bytes", directory / "memory.usage_in_bytes"))
    return free


def _own_cgroups(proc_root: Path) -> tuple[str, str]:
    """The process's cgroup paths from ``/proc/self/cgroup``: the v2 one (``0::/path``) and the
    v1 memory controller's (``N:memory:/path``); ``/`` where not listed."""
    v2, v1 = "/", "/"
    try:
        lines = (proc_root / "self" / "cgroup").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return v2, v1
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if hierarchy == "0" and not controllers:
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestry(base: Path, path: str) -> list[Path]:
    """``base/a/b``, ``base/a``, ``base`` for ``path`` = ``/a/b`` (no step above ``base``)."""
    parts = [part for part in path.split("/") if part and part not in {".", ".."}]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _free(limit_file: Path, usage_file: Path) -> int | None:
    limit = _read_int(limit_file)
    if limit is None or limit >= _V1_UNLIMITED:
        return None
    return max(0, limit - (_read_int(usage_file) or 0))


def _tighter(current: int | None, candidate: int | None) -> int | None:
    if candidate is None:
        return current
    return candidate if current is None else min(current, candidate)


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None if absent, unreadable, or ``max`` (no limit)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo(proc_root: Path) -> int | None:
    try:
        lines = (proc_root / "meminfo").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            number, _, unit = value.strip().partition(" ")
            if number.isdigit():
                return int(number) * (1024 if unit.strip() == "kB" else 1)
    return None
