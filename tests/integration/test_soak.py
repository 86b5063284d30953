"""The soak's short mode as part of ``make test``: a real ``medinfer serve`` (SQLite, the real
models, 90 % EHR / 10 % CXR) held at 80 % of its measured capacity for 50 s by bench/soak.py.

Always asserted, because they do not depend on timing: no answer but 200 (or an intended 429)
and no transport error, one audit event per 200, a chain that verifies, exit 0 on SIGTERM.

Stability is asserted as ratios against the same run's own start, and only when the machine was
quiet during the hold (other processes under bench.soak.QUIET_CORES on average; otherwise these
two are skipped with their figures, after everything above has passed). A neighbour that takes
a core turns 80 % of capacity into overload: a backlog builds, which raises both the tail latency
and the allocator's high-water mark, and neither then says anything about the service.

- RSS at the end < 1.10 x RSS after the first 20 % (10 s), as in the 10-minute run.
- p99 of the last 10 s <= 3 x p99 of the first 10 s, looser than the 10-minute run's 1.5x on
  whole minutes: a p99 over 10 s at 80 % of two cores rests on a handful of queueing episodes,
  and on a quiet machine one window can differ from the next by several times with no drift at
  all (seen: per-5-s p99 from 0.16 to 4.3 s within one undisturbed 50 s run).
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

#: The short run's bound on p99 last 10 s / first 10 s (bench/soak.py's default, for a 10-minute
#: run comparing whole minutes, is 1.5).
SHORT_P99_RATIO = 3.0


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
    assert summary["held_rps"] == pytest.approx(0.8 * summary["capacity_rps"], rel=0.02)
    unintended = {status: n for status, n in summary["statuses"].items() if status not in {"200", "429"}}
    assert unintended == {}
    assert summary["audit_rows"] == summary["successes"] > 0
    assert json.loads(summary["verify"])["valid"] is True
    assert summary["server_exit"] == 0
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert all(c["name"].startswith(("p99", "RSS")) for c in failed), failed

    figures = (
        f"p99 first {summary['p99_first_ms']:.0f} ms, last {summary['p99_last_ms']:.0f} ms; "
        f"RSS {summary['rss_warm_mb']:.0f} -> {summary['rss_end_mb']:.0f} MiB"
    )
    if summary["other_cores_mean"] >= QUIET_CORES:
        pytest.skip(
            f"p99 and RSS stability not judged: other processes used {summary['other_cores_mean']:.2f} cores "
            f"on average during the hold ({figures}); every other soak check passed"
        )
    assert summary["rss_growth"] < 0.10, figures
    assert summary["p99_ratio"] <= SHORT_P99_RATIO, figures
    assert result.returncode == 0, failed
