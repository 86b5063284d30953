"""Outcome feedback on the real ehr-heart-disease model: results predicted through the API, their
confirmed outcomes posted by request id, and the running performance read back from the API, the
audit trail and ``/metrics``."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.__main__ import main as cli
from app.config import Settings
from app.domain import RequestContext, Scope
from app.feedback import FeedbackService, Outcome
from app.main import create_app
from app.transport.http.routes_predict import FEATURES_EXAMPLE
from app.transport.http.schemas import EXAMPLE_REQUEST_ID
from tests.conftest import REPO_ROOT, register, wait_ready

MODEL = "ehr-heart-disease"


@dataclass(frozen=True)
class Env:
    client: TestClient
    settings: Settings
    his: str  # infer + feedback:write
    reader: str  # models:read + audit:read
    infer_only: str


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    repo = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / MODEL, repo / MODEL)
    settings = Settings(env="test", data_dir=tmp_path / "var", model_repository=repo, auth_cache_s=0)
    monkeypatch.setenv("MEDINFER_ENV", "test")
    monkeypatch.setenv("MEDINFER_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MEDINFER_MODEL_REPOSITORY", str(repo))
    assert cli(["migrate"]) == 0
    his = register(settings, Scope.INFER, Scope.FEEDBACK_WRITE, client_id="his")
    reader = register(settings, Scope.MODELS_READ, Scope.AUDIT_READ, client_id="dashboard")
    infer_only = register(settings, Scope.INFER, client_id="pacs-bridge")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield Env(client, settings, his, reader, infer_only)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _features(age: float, cp: str, oldpeak: float, thal: str) -> dict[str, Any]:
    return {
        "features": {
            "age": age, "sex": "male", "cp": cp, "trestbps": 140, "chol": 240, "fbs": 0, "restecg": 0,
            "thalach": 150, "exang": 0, "oldpeak": oldpeak, "slope": 2, "ca": 0, "thal": thal,
        }
    }  # fmt: skip


def _predict(env: Env, body: dict[str, Any], request_id: str, **query: str) -> dict[str, Any]:
    response = env.client.post(
        f"/v1/models/{MODEL}/predict",
        json=body,
        params=query,
        headers={**_auth(env.his), "X-Request-ID": request_id},
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["request_id"] == request_id
    return answer


def _feedback(env: Env, key: str | None = None, **body: object) -> Any:
    return env.client.post("/v1/feedback", json=body, headers=_auth(key or env.his))


def _rows(env: Env) -> list[tuple[Any, ...]]:
    with sqlite3.connect(env.settings.data_dir / "medinfer.db") as db:
        return db.execute(
            "SELECT request_id, version, decided_label, confirmed_label, verdict, recorded_by FROM outcome_feedback"
        ).fetchall()


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


# (age, chest pain, ST depression, thallium) -> probabilities from 0.16 to 0.84, all inside the
# training ranges, so every answer is decided (none indeterminate). Decided at the default
# threshold 0.4541: four no_cad, six cad.
NEGATIVES = [
    (40, "non-anginal-pain", 0.0, "normal"),
    (50, "non-anginal-pain", 1.0, "normal"),
    (40, "non-anginal-pain", 0.0, "reversible-defect"),
    (60, "non-anginal-pain", 0.0, "reversible-defect"),
]
POSITIVES = [
    (60, "non-anginal-pain", 1.0, "reversible-defect"),
    (50, "non-anginal-pain", 2.5, "reversible-defect"),
    (50, "asymptomatic", 1.0, "normal"),
    (40, "asymptomatic", 2.5, "normal"),
    (60, "asymptomatic", 2.5, "normal"),
    (50, "asymptomatic", 2.5, "reversible-defect"),
]


def _known_set(env: Env) -> list[tuple[float, bool]]:
    """4 TP, 1 FN, 3 TN, 2 FP, recorded with every verdict; returns (probability, confirmed cad)."""
    verdicts = [
        # decided no_cad: three right (TN), one missed disease (FN)
        {"verdict": "agree"}, {"verdict": "label", "confirmed_label": "no_cad"}, {"verdict": "agree"},
        {"verdict": "disagree", "reason": "angiography"},
        # decided cad: four right (TP), two false alarms (FP)
        {"verdict": "agree"}, {"verdict": "agree", "confirmed_label": "cad"},
        {"verdict": "label", "confirmed_label": "cad", "reason": "angiography"}, {"verdict": "agree"},
        {"verdict": "disagree", "confirmed_label": "no_cad"}, {"verdict": "label", "confirmed_label": "no_cad"},
    ]  # fmt: skip
    truth = []
    for i, (record, verdict) in enumerate(zip(NEGATIVES + POSITIVES, verdicts, strict=True)):
        answer = _predict(env, _features(*record), f"case-{i}")
        decided = answer["decision"]["label"]
        assert decided == ("no_cad" if i < len(NEGATIVES) else "cad"), answer["probabilities"]
        stored = _feedback(env, request_id=f"case-{i}", **verdict)
        assert stored.status_code == 201, stored.text
        body = stored.json()
        assert body["decided_label"] == decided
        assert body["probability"] == pytest.approx(answer["probabilities"]["cad"], abs=1e-6)
        assert (body["threshold"], body["operating_point"]) == (0.4541, "default")
        assert (body["model"], body["version"], body["model_sha256"]) == (MODEL, "1", answer["model"]["sha256"])
        assert body["recorded_by"] == "his"
        truth.append((body["probability"], body["confirmed_label"] == "cad"))
    return truth


def _ece(truth: list[tuple[float, bool]]) -> float:
    """Reference expected calibration error, 10 equal-width bins, vectorised with numpy."""
    p = np.array([t[0] for t in truth])
    y = np.array([t[1] for t in truth], dtype=float)
    bins = np.minimum((p * 10).astype(int), 9)
    return float(sum(np.mean(bins == b) * abs(p[bins == b].mean() - y[bins == b].mean()) for b in np.unique(bins)))


def test_performance_of_a_known_set_of_confirmed_outcomes(env: Env) -> None:
    truth = _known_set(env)

    response = env.client.get(f"/v1/models/{MODEL}/performance", headers=_auth(env.reader))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["positive_label"], body["sensitivity_margin"]) == ("cad", 0.1)
    (v1,) = body["versions"]
    assert v1["version"] == "1"
    assert v1["confirmed_cases"] == 10
    assert v1["confirmed_by_label"] == {"cad": 5, "no_cad": 5}
    decided = v1["as_decided"]
    counts = {k: decided[k] for k in ("true_positive", "false_negative", "true_negative", "false_positive")}
    assert counts == {"true_positive": 4, "false_negative": 1, "true_negative": 3, "false_positive": 2}
    # Wilson 95 % intervals; reference: scipy.stats.binomtest(k, n).proportion_ci(method="wilson").
    assert decided["sensitivity"] == pytest.approx(
        {"value": 0.8, "ci95_low": 0.375535, "ci95_high": 0.963776, "successes": 4, "total": 5}, abs=1e-6
    )
    assert decided["specificity"] == pytest.approx(
        {"value": 0.6, "ci95_low": 0.230724, "ci95_high": 0.882379, "successes": 3, "total": 5}, abs=1e-6
    )
    assert v1["calibration_error"] == pytest.approx(_ece(truth), abs=1e-9)
    assert v1["monitored_operating_point"] == "high_sensitivity"
    assert v1["below_floor"] is False  # 0.8 >= 0.8611 - 0.1
    points = {p["name"]: p for p in v1["operating_points"]}
    high = points["high_sensitivity"]
    assert (high["claimed_sensitivity"], high["claimed_specificity"], high["split"]) == (0.8611, 0.7083, "validation")
    assert high["sensitivity_floor"] == pytest.approx(0.7611)
    assert high["confirmed"]["true_positive"] == 4  # same threshold as the default: same table
    youden = points["youden"]  # re-thresholded at 0.6424: only the two highest cad cases stay positive
    expected_youden_tp = sum(1 for p, cad in truth if cad and p >= 0.6424)
    assert youden["confirmed"]["true_positive"] == expected_youden_tp
    assert youden["confirmed"]["sensitivity"]["value"] == pytest.approx(expected_youden_tp / 5)

    metrics = env.client.get("/metrics").text
    version = (("model", MODEL), ("version", "1"))
    assert _samples(metrics, "medinfer_confirmed_sensitivity")[version] == pytest.approx(0.8)
    assert _samples(metrics, "medinfer_confirmed_specificity")[version] == pytest.approx(0.6)
    assert _samples(metrics, "medinfer_confirmed_calibration_error")[version] == pytest.approx(_ece(truth))
    assert _samples(metrics, "medinfer_sensitivity_floor")[version] == pytest.approx(0.7611)
    cases = _samples(metrics, "medinfer_confirmed_cases")
    assert cases[(("label", "cad"), *version)] == cases[(("label", "no_cad"), *version)] == 5
    verdicts = _samples(metrics, "medinfer_feedback_total")
    assert {dict(k)["verdict"]: v for k, v in verdicts.items()} == {"agree": 5, "disagree": 2, "label": 3}


def test_feedback_is_audited_without_phi(env: Env) -> None:
    answer = _predict(env, FEATURES_EXAMPLE, "audited-1")
    assert answer["decision"]["label"] == "cad"
    response = env.client.post(
        "/v1/feedback",
        json={"request_id": "audited-1", "verdict": "disagree", "reason": "angiography"},
        headers={**_auth(env.his), "X-Request-ID": "feedback-call-1"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["X-Request-ID"] == "feedback-call-1"

    events = env.client.get("/v1/audit/events", params={"action": "feedback"}, headers=_auth(env.reader)).json()
    (event,) = events["events"]
    assert (event["outcome"], event["actor"], event["request_id"]) == ("success", "his", "feedback-call-1")
    assert (event["model"], event["model_version"]) == (MODEL, "1")
    assert event["detail"] == {  # label names, a coded reason, the result's id and audit link: no patient data
        "result_request_id": "audited-1",
        "result_audit_seq": event["detail"]["result_audit_seq"],
        "verdict": "disagree",
        "decided_label": "cad",
        "confirmed_label": "no_cad",
        "reason": "angiography",
    }
    assert event["patient_pseudonym"] is None
    inference = env.client.get("/v1/audit/events", params={"action": "inference"}, headers=_auth(env.reader)).json()
    assert event["detail"]["result_audit_seq"] == inference["events"][0]["seq"]
    assert env.client.get("/v1/audit/verify", headers=_auth(env.reader)).json()["valid"] is True


def test_feedback_sent_twice_is_a_conflict_and_stored_once(env: Env) -> None:
    _predict(env, FEATURES_EXAMPLE, "twice-1")
    first = _feedback(env, request_id="twice-1", verdict="agree")
    assert first.status_code == 201
    again = _feedback(env, request_id="twice-1", verdict="disagree")
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    assert again.json()["code"] == "feedback-conflict"
    assert "already recorded" in again.json()["detail"]
    assert _rows(env) == [("twice-1", "1", "cad", "cad", "agree", "his")]
    performance = env.client.get(f"/v1/models/{MODEL}/performance", headers=_auth(env.reader)).json()
    assert performance["versions"][0]["confirmed_cases"] == 1
    events = env.client.get("/v1/audit/events", params={"action": "feedback"}, headers=_auth(env.reader)).json()
    assert [(e["outcome"], e["detail"].get("error_code")) for e in events["events"]] == [
        ("success", None),
        ("failure", "feedback-conflict"),
    ]


def test_unknown_request_id_is_not_found(env: Env) -> None:
    response = _feedback(env, request_id="never-predicted", verdict="agree")
    assert response.status_code == 404
    assert response.json()["code"] == "result-not-found"
    _predict(env, FEATURES_EXAMPLE, "other-model-1")
    wrong_model = _feedback(env, request_id="other-model-1", verdict="agree", model="cxr-pneumonia")
    assert wrong_model.status_code == 404
    assert _rows(env) == []


def test_feedback_needs_the_feedback_scope(env: Env) -> None:
    _predict(env, FEATURES_EXAMPLE, "scoped-1")
    refused = _feedback(env, env.infer_only, request_id="scoped-1", verdict="agree")
    assert refused.status_code == 403
    assert refused.json()["detail"] == "scope 'feedback:write' required"
    assert env.client.post("/v1/feedback", json={"request_id": "scoped-1", "verdict": "agree"}).status_code == 401
    assert env.client.get(f"/v1/models/{MODEL}/performance", headers=_auth(env.infer_only)).status_code == 403
    assert _rows(env) == []


def test_the_cli_registers_a_feedback_client(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    _predict(env, FEATURES_EXAMPLE, "cli-1")
    assert cli(["clients", "register", "--client-id", "ward-7", "--scope", "feedback:write"]) == 0
    key = json.loads(capsys.readouterr().out)["api_key"]
    assert _feedback(env, key, request_id="cli-1", verdict="agree").status_code == 201
    assert _rows(env)[0][-1] == "ward-7"


def test_indeterminate_and_failed_results_cannot_be_judged(env: Env) -> None:
    answer = _predict(env, _features(90, "asymptomatic", 2.5, "normal"), "outside-1")  # age 90 > training 77
    assert answer["decision"]["indeterminate"] is True
    outside = _feedback(env, request_id="outside-1", verdict="label", confirmed_label="cad")
    assert outside.status_code == 409
    assert "indeterminate" in outside.json()["detail"]

    failed = env.client.post(
        f"/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]},
        headers={**_auth(env.his), "X-Request-ID": "failed-1"},
    )
    assert failed.status_code == 422, failed.text
    refused = _feedback(env, request_id="failed-1", verdict="agree")
    assert refused.status_code == 409
    assert "failed" in refused.json()["detail"]
    assert _rows(env) == []


def test_labels_and_verdicts_are_checked(env: Env) -> None:
    _predict(env, FEATURES_EXAMPLE, "checked-1")  # decided cad
    cases = [
        ({"verdict": "label"}, "needs a confirmed_label"),
        ({"verdict": "label", "confirmed_label": "pneumonia"}, "one of no_cad, cad"),
        ({"verdict": "agree", "confirmed_label": "no_cad"}, "other than the decided"),
        ({"verdict": "disagree", "confirmed_label": "cad"}, "decided label"),
    ]
    for body, message in cases:
        response = _feedback(env, request_id="checked-1", **body)
        assert response.status_code == 422, body
        assert message in response.json()["detail"], response.json()
    free_text = _feedback(env, request_id="checked-1", verdict="agree", comment="Mr Smith, bed 4")
    assert free_text.status_code == 422
    assert "Smith" not in free_text.text
    assert _feedback(env, request_id="checked-1", verdict="agree", reason="told by the patient").status_code == 422
    assert _rows(env) == []


def test_the_documented_example_works_when_sent(env: Env) -> None:
    document = env.client.get("/openapi.json").json()
    operation = document["paths"]["/v1/feedback"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    example = document["components"]["schemas"][ref]["example"]
    assert example["request_id"] == EXAMPLE_REQUEST_ID
    answer = _predict(env, FEATURES_EXAMPLE, EXAMPLE_REQUEST_ID)  # what the example disagrees with
    assert answer["decision"]["label"] == "cad"
    response = env.client.post("/v1/feedback", json=example, headers=_auth(env.his))
    assert response.status_code == 201, response.text
    documented = operation["responses"]["201"]["content"]["application/json"]
    schema = documented.get("example") or document["components"]["schemas"]["FeedbackOut"]["example"]
    assert set(response.json()) == set(schema)


def test_recorded_at_comes_from_the_injected_clock(env: Env) -> None:
    _predict(env, FEATURES_EXAMPLE, "clocked-1")
    container = env.client.app.state.container  # type: ignore[attr-defined]
    moment = datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)
    service = FeedbackService(
        container.sessionmaker, container.pipeline.audit, container.registry, container.metrics, clock=lambda: moment
    )
    context = RequestContext(actor="ward-7", request_id="call-9", source_ip="127.0.0.1")
    record = env.client.portal.call(service.record, Outcome("clocked-1", "agree"), context)  # type: ignore[union-attr]
    assert record.recorded_at == moment
    with sqlite3.connect(env.settings.data_dir / "medinfer.db") as db:
        (stored,) = db.execute("SELECT recorded_at FROM outcome_feedback").fetchone()
    assert datetime.fromisoformat(stored).replace(tzinfo=UTC) == moment
