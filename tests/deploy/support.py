"""Helpers shared by the deployment tests: paths, the app's metric names, PromQL, promtool, checkov.

Nothing here needs the network, a cluster or a Docker engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.domain import VersionState, VersionStatus
from app.observability.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = KUBERNETES / "overlays"
SECRET_TEMPLATES = KUBERNETES / "secrets"
ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_RULE = BASE / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "medinfer.json"
OPERATIONS = REPO / "docs" / "operations.md"
METRICS_SOURCE = REPO / "app" / "observability" / "metrics.py"

#: Metrics the alerts may name before the service exports them, each with why it is awaited.
#: Keep this list short and visible: an alert on a planned metric can never fire until it lands.
PLANNED_METRICS: dict[str, str] = {}
#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})

PROMTOOL_HINT = (
    "promtool is missing: install Debian's `prometheus` package (`apt-get install -y prometheus`, "
    "which `make test` does) or set MEDINFER_PROMTOOL"
)


# ---------------------------------------------------------------------------------------------
# YAML


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


# ---------------------------------------------------------------------------------------------
# The service's metrics


class _FakeNvml(types.ModuleType):
    """Just enough of pynvml for ``Metrics.watch_gpus`` to register its collector: one GPU."""

    def __init__(self) -> None:
        super().__init__("pynvml")

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        return None

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUtilizationRates(self, _handle: int) -> types.SimpleNamespace:  # noqa: N802
        return types.SimpleNamespace(gpu=50)

    def nvmlDeviceGetMemoryInfo(self, _handle: int) -> types.SimpleNamespace:  # noqa: N802
        return types.SimpleNamespace(used=1024)


_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def app_metric_families() -> dict[str, str]:
    """Family name -> type, for every metric ``app.observability.metrics.Metrics`` can export.

    The model-status collector is fed one ready version, the key-expiry collector one key, and the
    GPU collector is registered through ``watch_gpus`` with a stand-in NVML, so their families show.
    """
    metrics = Metrics(version="0.0.0-test")
    status = VersionStatus(model="m", version="1", state=VersionState.READY, sha256="0" * 64, providers=("CPU",))
    metrics.watch_models(lambda: [status])
    metrics.watch_keys(lambda: [("kid-1", 1.9e9)])
    saved = sys.modules.get("pynvml")
    sys.modules["pynvml"] = _FakeNvml()
    try:
        assert metrics.watch_gpus(), "the GPU collector did not register with the stand-in NVML"
    finally:
        if saved is None:
            del sys.modules["pynvml"]
        else:
            sys.modules["pynvml"] = saved
    return {family.name: family.type for family in metrics.registry.collect()}


def app_series_by_family() -> dict[str, frozenset[str]]:
    """Family name -> the series names a scrape carries for it (``_total``, ``_bucket`` ...)."""
    return {
        family: frozenset(family + suffix for suffix in _SAMPLE_SUFFIXES[kind])
        for family, kind in app_metric_families().items()
    }


def app_series_names() -> frozenset[str]:
    """Every series name a scrape of the service can carry."""
    return frozenset().union(*app_series_by_family().values())


def check_known_metrics(names: Iterable[str], where: str) -> None:
    """Fail naming every metric that neither the service, Prometheus nor the planned list has."""
    known = app_series_names() | PROMETHEUS_SERIES | set(PLANNED_METRICS)
    unknown = sorted(set(names) - known)
    assert not unknown, f"{where} uses metrics the service does not define ({METRICS_SOURCE}): {unknown}"


# ---------------------------------------------------------------------------------------------
# PromQL


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan", "atan2"}
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a lexical scan, enough for our own queries).

    Strings, Grafana variables, label matchers, ranges and grouping clauses are removed first;
    what remains that is neither a function call, a keyword nor a number is a metric name.
    ``{__name__="..."}`` selectors are refused: name metrics plainly.
    """
    assert "__name__" not in expr, f"select metrics by name, not by __name__: {expr}"
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {m for m in _IDENTIFIER.findall(text) if m.lower() not in _KEYWORDS}


# ---------------------------------------------------------------------------------------------
# Tools: promtool and checkov, looked up the way the project's other static tests do


def promtool_path() -> Path:
    configured = os.environ.get("MEDINFER_PROMTOOL") or shutil.which("promtool")
    if not configured or not Path(configured).is_file() or not os.access(configured, os.X_OK):
        pytest.fail(PROMTOOL_HINT)
    return Path(configured)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(promtool_path()), *args]
    try:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"promtool ran past 60 s: {' '.join(argv)}")


# ---------------------------------------------------------------------------------------------
# docs/operations.md


def markdown_anchors(path: Path) -> set[str]:
    """GitHub-style anchors of every heading in a Markdown file (fenced code skipped)."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        text = re.sub(r"[`*]", "", match.group(1)).strip().lower()
        anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors
