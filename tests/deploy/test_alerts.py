"""deploy/prometheus/alerts.yml: promtool checks and unit tests, shape, metrics, runbooks, and its
Kubernetes twin deploy/kubernetes/base/prometheusrule.yaml.

promtool comes from Debian's `prometheus` package; the tests fail (not skip) without it.
``python -m tests.deploy.test_alerts`` rewrites the PrometheusRule from alerts.yml.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    ALERTS,
    ALERTS_TEST,
    OPERATIONS,
    PLANNED_METRICS,
    PROMETHEUS_RULE,
    REPO,
    app_series_by_family,
    app_series_names,
    check_known_metrics,
    load_yaml,
    markdown_anchors,
    promql_metric_names,
    run_promtool,
)

SEVERITIES = {"critical", "warning"}
#: What the alerts must cover, by alert name.
REQUIRED_ALERTS = {
    "MedinferDown",  # service down: no target up, or none discovered
    "MedinferTargetDown",
    "MedinferHighErrorRate",  # 5xx ratio
    "MedinferHighLatencyP99",
    "MedinferQueueSaturated",  # queue depth
    "MedinferRequestsRejected",  # rejected / deadline outcomes
    "MedinferAuditWriteFailures",  # results withheld
    "MedinferAuditRollback",  # the database trail no longer extends its signed checkpoint
    "MedinferModelVersionNotReady",  # model load failure
    "MedinferModelUnavailable",
    "MedinferPacsResultsDelayed",  # PACS outbox backlog: results not reaching radiologists
    "MedinferPacsResultsUndeliverable",
    "MedinferKeyExpiringSoon",  # key expiry
    "MedinferKeyExpiryImminent",
    "MedinferFeatureDrift",  # input PSI against the training reference
    "MedinferIndeterminateRateHigh",  # answers outside the validated input
    "MedinferConfirmedSensitivityBelowClaim",  # confirmed outcomes against the model card's claim
}
RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `python -m tests.deploy.test_alerts`: edit that
# file, then regenerate this one (tests/deploy/test_alerts.py fails while the two differ).
#
# The Prometheus Operator loads it when its ruleSelector matches these labels; `release:
# kube-prometheus-stack` is that chart's default: change it to what your Prometheus selects.
"""
RULE_METADATA = {
    "name": "medinfer",
    "labels": {
        "app.kubernetes.io/name": "medinfer",
        "app.kubernetes.io/part-of": "medinfer",
        "app.kubernetes.io/component": "monitoring",
        "medinfer.io/stage": "service",
        "release": "kube-prometheus-stack",
    },
}


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


class _BlockDumper(yaml.SafeDumper):
    """Indented lists, and multi-line strings (PromQL) as literal blocks: reads like the source."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def prometheus_rule_text() -> str:
    """The PrometheusRule carrying alerts.yml's groups, as committed in deploy/kubernetes/base."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": RULE_METADATA,
        "spec": {"groups": load_yaml(ALERTS)["groups"]},
    }
    body = yaml.dump(rule, Dumper=_BlockDumper, sort_keys=False, width=120, allow_unicode=True)
    return RULE_HEADER + body


# ---------------------------------------------------------------------------------------------
# promtool


def test_promtool_checks_the_rules() -> None:
    done = run_promtool("check", "rules", str(ALERTS.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    suite = load_yaml(ALERTS_TEST)
    assert suite["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - fired == set(), "alerts never seen firing in alerts_test.yml"
    assert names - silent == set(), "alerts never seen staying quiet in alerts_test.yml"
    assert (fired | silent) - names == set(), "alerts_test.yml tests alerts that do not exist"


# ---------------------------------------------------------------------------------------------
# Shape


def test_the_required_alerts_exist() -> None:
    names = [rule["alert"] for rule in _alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) == REQUIRED_ALERTS
    assert all("record" not in rule for rule in _alert_rules()), "recording rules belong elsewhere"


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_annotations_and_a_runbook(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"Medinfer[A-Z][A-Za-z0-9]+", rule["alert"])
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == "docs/operations.md"
    assert anchor == rule["alert"].lower()
    assert anchor in markdown_anchors(OPERATIONS), f"docs/operations.md has no section #{anchor}"
    assert 'job="medinfer"' in rule["expr"], "select the medinfer scrape job (compose and ServiceMonitor name it so)"


def test_audit_write_failures_page_at_once() -> None:
    (rule,) = [r for r in _alert_rules() if r["alert"] == "MedinferAuditWriteFailures"]
    assert rule["labels"]["severity"] == "critical"
    assert rule.get("for", "0s") in {"0s", "0m"}, "any failure withholds results: no pending period"
    assert promql_metric_names(rule["expr"]) == {"medinfer_audit_write_failures_total"}
    assert re.search(r"\)\s*>\s*0\s*$", rule["expr"])


def test_clinical_alerts_use_the_declared_thresholds_and_wait_an_hour() -> None:
    """PSI > 0.25 (a major shift) for 1 h; > 20 % indeterminate with a minimum count of decisions;
    sensitivity below the declared floor only with enough confirmed cases, for 1 h."""
    rules = {r["alert"]: r for r in _alert_rules()}
    drift = rules["MedinferFeatureDrift"]
    assert re.search(r"medinfer_feature_psi\{[^}]*\}\)\s*>\s*0\.25\s*$", drift["expr"])
    assert drift["for"] == "1h"
    indeterminate = rules["MedinferIndeterminateRateHigh"]["expr"]
    assert 'label="indeterminate"' in indeterminate
    assert re.search(r"\)\s*>\s*0\.2\s", indeterminate)
    assert re.search(r">=\s*50\s*$", indeterminate)
    sensitivity = rules["MedinferConfirmedSensitivityBelowClaim"]
    assert promql_metric_names(sensitivity["expr"]) == {
        "medinfer_confirmed_sensitivity",
        "medinfer_sensitivity_floor",
        "medinfer_confirmed_cases",
    }
    assert re.search(r">=\s*30\s*$", sensitivity["expr"])
    assert sensitivity["for"] == "1h"


# ---------------------------------------------------------------------------------------------
# Metrics


def test_alerts_use_only_metrics_the_service_defines() -> None:
    used: set[str] = set()
    for rule in _alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in its expression"
        used |= names
    check_known_metrics(used, str(ALERTS))
    assert set(PLANNED_METRICS) <= used, "a planned metric nothing uses should leave PLANNED_METRICS"


def test_planned_metrics_are_not_defined_yet() -> None:
    landed = set(PLANNED_METRICS) & app_series_names()
    assert not landed, f"{landed} now exist in app/observability/metrics.py: remove them from PLANNED_METRICS"


def test_promql_metric_name_scanner() -> None:
    expr = (
        'sum by (le, route) (rate(medinfer_http_request_duration_seconds_bucket{route!~"/a|b", le="+Inf"}[5m]))'
        ' / ignoring(route) group_left sum(up{job="medinfer"} offset 1h) > bool 0.5e3'
        " or absent(medinfer_build_info) * on(instance) time() - 14 * 86400"
    )
    assert promql_metric_names(expr) == {"medinfer_http_request_duration_seconds_bucket", "up", "medinfer_build_info"}
    assert promql_metric_names("histogram_quantile(0.99, sum(rate(x_bucket[$__rate_interval])) by (le))") == {
        "x_bucket"
    }


# ---------------------------------------------------------------------------------------------
# The PrometheusRule


def test_prometheus_rule_carries_the_same_groups() -> None:
    rule = load_yaml(PROMETHEUS_RULE)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]
    assert PROMETHEUS_RULE.read_text(encoding="utf-8") == prometheus_rule_text(), (
        "deploy/kubernetes/base/prometheusrule.yaml is stale: run `python -m tests.deploy.test_alerts`"
    )


def test_operations_doc_lists_every_metric() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    for family, series in app_series_by_family().items():
        assert any(f"`{name}`" in text for name in {family, *series}), f"docs/operations.md does not list {family}"
    for name in PLANNED_METRICS:
        assert re.search(rf"`{name}`.*planned", text), f"docs/operations.md should list {name} as planned"


def test_compose_prometheus_scrape_job_is_the_one_the_alerts_select() -> None:
    config = load_yaml(REPO / "deploy" / "compose" / "prometheus.yml")
    assert "medinfer" in {job["job_name"] for job in config["scrape_configs"]}


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text(), encoding="utf-8")
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}")
