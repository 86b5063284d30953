"""The soak's short mode as part of ``make test``: a real ``medinfer serve`` (SQLite, the real
models, 90 % EHR / 10 % CXR) held at 80 % of its measured capacity for 50 s by bench/soak.py.

Always asserted, because they do not depend on timing: no answer but 200 (or an intended 429)
and no transport error, one audit event per 200, a chain that verifies, exit 0 on SIGTERM.

Also asserted: the service kept up (its last answer at most 5 s after the last scheduled send,
so no backlog built) and 429s stay under 1 %.

Stability is asserted as ratios against the same run's own start. When the machine was busy
during the hold (other processes over bench.soak.QUIET_CORES on average), the bounds are looser
(p99 10x, RSS +25 %), never skipped: a neighbour that takes a core turns 80 % of capacity into
overload, a backlog builds, and that raises both the tail latency and the allocator's high-water
mark without saying anything about the service.

- RSS at the end < 1.10 x RSS after the first 20 % (10 s), as in the 10-minute run.
- the median per-second p99 of the second half <= 4 x that of the first half, looser than the
  10-minute run's 1.5x on whole minutes: at 80 % of two cores, queueing episodes of one to ten
  seconds set the tail. On a quiet machine the p99 of the last 10 s ranged from 0.6x to 4.3x
  that of the first 10 s between runs with flat RSS; this measure ranged 1.0x to 2.3x.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import QUIET_CORES
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

#: The short run's bound on the halves' median per-second p99 (bench/soak.py's default, for a
#: 10-minute run comparing the p99 of whole minutes, is 1.5).
SHORT_P99_RATIO = 4.0
#: Where other processes took CPU during the hold (see the module docstring): looser, never skipped.
BUSY_P99_RATIO = 10.0
BUSY_RSS_GROWTH = 0.25


def test_short_soak_at_80_percent_has_no_errors_no_drift_and_an_audit_event_per_answer(tmp_path: Path) -> None:
    summary_path = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "soak.py"),
            "--short",
            "--settle-s",
            "20",
            "--p99-ratio",
            str(SHORT_P99_RATIO),
            "--json",
            str(summary_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
        cwd=REPO_ROOT,
    )
    print(result.stdout)  # the soak's tables, visible with -s or on failure
    assert summary_path.exists(), result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())

    assert summary["capacity_rps"] > 0
    # It kept up: what was answered, not what was sent (the schedule sends whatever the answers do).
    assert summary["drain_s"] <= 5.0, summary["drain_s"]
    unintended = {status: n for status, n in summary["statuses"].items() if status not in {"200", "429"}}
    assert unintended == {}
    assert summary["refused_429"] <= 0.01 * summary["requests"]
    assert summary["audit_rows"] == summary["successes"] > 0
    assert json.loads(summary["verify"])["valid"] is True
    assert summary["server_exit"] == 0
    failed = [c["name"] for c in summary["checks"] if not c["passed"]]
    assert result.returncode == (1 if failed else 0), result.stderr

    figures = (
        f"p99 first {summary['p99_first_ms']:.0f} ms, last {summary['p99_last_ms']:.0f} ms; "
        f"RSS {summary['rss_warm_mb']:.0f} -> {summary['rss_end_mb']:.0f} MiB; "
        f"other processes {summary['other_cores_mean']:.2f} cores"
    )
    # Stability is always judged. On a quiet machine with the bounds above; where neighbours took
    # CPU during the hold, 80 % of capacity became overload for a while, and only a drift beyond
    # what that explains fails (a leak still does: RSS may not grow by a quarter).
    quiet = summary["other_cores_mean"] < QUIET_CORES
    assert summary["rss_growth"] < (0.10 if quiet else BUSY_RSS_GROWTH), figures
    assert summary["p99_ratio"] <= (SHORT_P99_RATIO if quiet else BUSY_P99_RATIO), figures
