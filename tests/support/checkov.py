"""Running checkov offline, shared by the container and the Kubernetes checks.

``make test`` installs checkov into ``.venv-checkov`` (its dependency tree clashes with the
project's); ``MEDINFER_CHECKOV`` points elsewhere. A missing checkov fails the test, never skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKOV_TIMEOUT_S = 240  # below pytest-timeout's 300 s, so a hang fails with checkov's own output
CHECKOV_HINT = "run `make test` (it creates .venv-checkov with checkov) or set MEDINFER_CHECKOV"


def checkov_path() -> Path:
    configured = os.environ.get("MEDINFER_CHECKOV", ".venv-checkov/bin/checkov")
    path = Path(configured) if Path(configured).is_absolute() else REPO / configured
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"checkov not found at {path}: {CHECKOV_HINT}")
    return path


def run_checkov(*args: str, quiet: bool = False) -> list[dict[str, Any]]:
    """Run checkov offline (no update check, no platform mapping, no downloads); one report per
    framework. ``quiet`` leaves out passed checks; without it they are reported per file too."""
    env = {
        **os.environ,
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",  # no PyPI version check at start-up
        "BC_SKIP_MAPPING": "TRUE",  # no platform metadata download
        "LOG_LEVEL": "WARNING",
    }
    argv = [str(checkov_path()), "--skip-download", *(["--quiet"] if quiet else []), "--compact", "-o", "json", *args]
    try:
        done = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=CHECKOV_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"checkov ran past {CHECKOV_TIMEOUT_S}s: {' '.join(argv)}")
    # 0: no failed check; 1: failed checks (reported by the caller); anything else: checkov failed.
    assert done.returncode in {0, 1}, f"checkov exited {done.returncode}:\n{done.stderr[-4000:]}"
    output = json.loads(done.stdout)
    reports = output if isinstance(output, list) else [output]
    # With nothing to report checkov prints the bare summary.
    return [r if "summary" in r else {"summary": r, "results": {"failed_checks": []}} for r in reports]
