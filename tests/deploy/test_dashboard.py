"""deploy/grafana/medinfer.json: structure, datasource variable, and that every query is valid
PromQL over metrics the service defines (app/observability/metrics.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    DASHBOARD,
    app_series_by_family,
    check_known_metrics,
    promql_metric_names,
    run_promtool,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
REQUIRED_ROWS = [
    "Overview",
    "Traffic",
    "Latency",
    "Batching",
    "Models",
    "Predictions",
    "Security",
    "Audit",
    "GPU",
    "Imaging",
    "Clinical safety",
    "Drift",
    "Explanations and outcomes",
]
#: Grafana's variables, replaced by something PromQL accepts before promtool parses a query.
VARIABLE_VALUES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$model": ".*",
    "$label": ".*",
}

Panel = dict[str, Any]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[Panel]) -> Iterator[Panel]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(name, PromQL selector) of every ``label_values(selector, label)`` template variable."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: only label_values(selector, label) is used here"
        yield variable["name"], match.group(1)


def test_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "medinfer"
    assert dashboard["title"] == "medinfer"
    assert isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None, "an exported id ties the file to one Grafana"


def test_datasource_is_a_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, f"panel {panel['id']} {panel['title']!r}"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, f"panel {panel['id']} {target['refId']}"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    # No datasource is named by a fixed uid anywhere (Grafana's built-in annotations aside).
    fixed = set(re.findall(r'"uid":\s*"([^"]*)"', json.dumps(dashboard))) - {
        "${datasource}",
        "-- Grafana --",
        "medinfer",
    }
    assert not fixed, f"hard-coded datasource uids: {fixed}"


def test_panel_ids_are_unique_and_the_layout_fits(dashboard: dict[str, Any]) -> None:
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["w"] > 0
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['id']} overflows the 24-column grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]
    for panel in panels:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), f"panel {panel['id']}: duplicate refIds"
        assert panel["type"] == "row" or refs, f"panel {panel['id']} has no query"


def test_rows(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == REQUIRED_ROWS


def test_queries_use_only_metrics_the_service_defines(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for where, expr in [*queries(dashboard), *variable_queries(dashboard)]:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        used |= names
    check_known_metrics(used, str(DASHBOARD))


def test_every_metric_of_the_service_has_a_panel(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr in queries(dashboard) for name in promql_metric_names(expr)}
    missing = sorted(family for family, series in app_series_by_family().items() if not series & used)
    assert missing == [], "metrics of the service the dashboard does not show"


def test_latency_quantiles(dashboard: dict[str, Any]) -> None:
    panels = {p["title"]: p for p in all_panels(dashboard["panels"])}
    exprs = " ".join(t["expr"] for t in panels["API latency p50 / p95 / p99"]["targets"])
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs
    timed = [p for title, p in panels.items() if "latency" in title.lower() and p["type"] != "row"]
    assert timed
    assert all(p["fieldConfig"]["defaults"]["unit"] == "s" for p in timed)


def test_drift_panels_mark_the_thresholds_the_alerts_use(dashboard: dict[str, Any]) -> None:
    """The PSI panels colour 0.1 (moderate) and 0.25 (major, MedinferFeatureDrift); the indeterminate
    share marks 20 % (MedinferIndeterminateRateHigh); the sensitivity panel draws the claimed floor."""
    panels = {p["title"]: p for p in all_panels(dashboard["panels"])}

    def steps(title: str) -> list[float]:
        thresholds = panels[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return [step["value"] for step in thresholds if step["value"] is not None]

    assert steps("Feature PSI (sliding window vs training)") == [0.1, 0.25]
    assert steps("Feature PSI now") == [0.1, 0.25]
    assert steps("Indeterminate share of decisions") == [0.2]
    exprs = [t["expr"] for t in panels["Confirmed sensitivity vs claimed floor"]["targets"]]
    assert [promql_metric_names(e) for e in exprs] == [
        {"medinfer_confirmed_sensitivity"},
        {"medinfer_sensitivity_floor"},
    ]
    imputation = panels["Imputation rate by feature"]["targets"][0]["expr"]
    assert promql_metric_names(imputation) == {"medinfer_features_imputed_total", "medinfer_records_total"}


def test_queries_parse_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every query (variables substituted) as the expression of a recording rule."""
    rules = []
    for index, (_, expr) in enumerate(queries(dashboard)):
        text = expr
        for variable, value in VARIABLE_VALUES.items():
            text = text.replace(variable, value)
        assert "$" not in text, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{index}", "expr": text})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout
