"""Schemathesis against the running service, driven by the OpenAPI document that service serves.

Every operation is fuzzed (examples, coverage and fuzzing phases), authenticated as a client
holding every scope. The stages run in file order, which matters:

1. operations that read or infer;
2. stateful scenarios over the links schemathesis infers between operations (list a model, then
   describe, load, unload, predict with or infer on it);
3. the administrative operations, which unload models and register clients;
4. the audit operations, last, over the trail every other stage wrote;
5. the tally: at least ``MIN_TOTAL_CASES`` cases, the service still usable, and a clean log, for a
   failure after a streamed 200 is not a status any check can see.

Every check schemathesis has is on, with two adjustments, each scoped and explained where it is
made: `positive_data_acceptance` also expects the documented 400/422 where a body carries what a
JSON Schema cannot describe (and the v2 "not ready" 400); in the stateful scenarios, which unload
models, `not_a_server_error` admits the documented 503 of a model that is not serving, and
nothing else. (`use_after_free`, `ensure_resource_availability`, `object_level_authorization`
and `missing_required_header` run but find nothing to act on: no operation deletes, owns or
requires a header.)

PostgreSQL rather than SQLite: it is what production runs, and it refuses what SQLite lets through
(NUL characters in text, integers past 64 bits), so fuzzed parameters that reach the database meet
the errors they would meet in a hospital.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import Case, CheckContext
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.schemas import OpenApiSchema
from schemathesis.transport import SerializationContext, register_serializer
from schemathesis.transport.serialization import Binary, serialize_binary
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.domain import Scope
from tests.conftest import REPO_ROOT, require_env
from tests.integration.conftest import Served, base_env, medinfer, register_key, serve

pytestmark = pytest.mark.integration
AnyCase = Case[Any]

#: A fixed seed keeps `make test` reproducible. Set MEDINFER_TEST_FUZZ_SEED to explore (the stateful
#: scenarios are then drawn afresh too) and MEDINFER_TEST_FUZZ_EXAMPLES to go deeper (200 takes about
#: six minutes: raise pytest's `-o timeout=` to match).
SEED = int(os.environ.get("MEDINFER_TEST_FUZZ_SEED", "20261128"))
EXPLORING = "MEDINFER_TEST_FUZZ_SEED" in os.environ
#: Fuzzing-phase cases per operation (the examples and coverage phases add their own), and the
#: number of stateful scenarios, each up to `STATEFUL_STEPS` linked calls. About 2,000 cases in a
#: minute on two cores.
MAX_EXAMPLES = int(os.environ.get("MEDINFER_TEST_FUZZ_EXAMPLES", "50"))
STATEFUL_SCENARIOS = MAX_EXAMPLES
STATEFUL_STEPS = 6
MIN_TOTAL_CASES = 1000
MODELS = ("cxr-pneumonia", "ehr-heart-disease")
BOUNDARY = "medinfer-fuzz"

#: schemathesis' own default for `positive_data_acceptance`.
ACCEPTED = ("2xx", "3xx", "401", "403", "404", "409", "429", "5xx")
#: Operations whose bodies carry what no JSON Schema can say: DICOM bytes, features of one model's
#: own, tensors whose data must fill their shape, JWKs that must be usable keys. The service checks
#: those and answers 400 or 422, both documented, to requests the schema alone would call valid.
CONTENT_CHECKED = (
    "predict",
    "v2ModelInfer",
    "v2ModelVersionInfer",
    "storeInstances",
    "storeStudyInstances",
    "registerClient",
)
#: The Open Inference Protocol's readiness routes answer "not ready" as a bare 400, as Triton does,
#: to any well-formed request while a model (or the server) is not serving.
NOT_READY_IS_400 = ("v2GetServerReady", "v2GetModelReady", "v2GetModelVersionReady")


@dataclass
class Target:
    base_url: str
    api_key: str
    served: Served
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def count(self, label: str, response: Response) -> None:
        self.cases[label] += 1
        self.statuses[label, response.status_code] += 1

    def tally(self) -> str:
        """Cases per operation, with the statuses they were answered."""
        lines = []
        for label, n in sorted(self.cases.items()):
            answered = sorted((status, k) for (at, status), k in self.statuses.items() if at == label)
            lines.append(f"{n:6d}  {label}  " + " ".join(f"{status}x{k}" for status, k in answered))
        return "\n".join(lines)

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def fuzz_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the module, as `pg_url` makes one for a test."""
    admin = create_engine(require_env("MEDINFER_TEST_PG_ADMIN_URL"), isolation_level="AUTOCOMMIT")
    name = f"medinfer_fuzz_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER medinfer'))
    try:
        yield make_url(require_env("MEDINFER_TEST_PG_URL")).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, fuzz_database: str) -> Iterator[Target]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    env = base_env(tmp_path, REPO_ROOT / "models", fuzz_database)
    migrated = medinfer(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    key = register_key(env, "fuzzer", *(scope.value for scope in Scope))
    served = serve(env, tmp_path / "serve.log")
    try:
        yield Target(base_url=served.base_url, api_key=key, served=served)
    finally:
        served.stop()


@pytest.fixture(scope="module")
def api(target: Target) -> OpenApiSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # The document names the `make run` address; the fuzzed service listens elsewhere.
            "base-url": target.base_url,
            "auth": {"openapi": {"apiKey": {"bearer": target.api_key}}},
            "request-timeout": 30,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "operations": [
                {
                    "include-operation-id": list(CONTENT_CHECKED),
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400", "422"]}},
                },
                {
                    "include-operation-id": list(NOT_READY_IS_400),
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400"]}},
                },
            ],
        }
    )
    return schemathesis.openapi.from_url(f"{target.base_url}/openapi.json", config=config)


def _related(ctx: SerializationContext, value: Any) -> dict[str, Any]:
    """multipart/related, which schemathesis cannot encode, with the boundary its header needs.

    A value of the documented type (binary) is framed as one application/dicom part, so the bytes
    reach the DICOM reader; a value of another type (a negative case) is the whole body, so the
    envelope parser gets fuzzed too.
    """
    if isinstance(value, bytes | Binary):
        opening = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body = opening + serialize_binary(value) + f"\r\n--{BOUNDARY}--\r\n".encode()
    else:
        body = serialize_binary(value)
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return {"data": body, "headers": {"Content-Type": content_type}}


# Process-wide registrations; nothing else in the suite drives schemathesis.
register_serializer(_related, "multipart/related")
schemathesis.serializer.alias("application/dicom", "application/octet-stream")
schemathesis.serializer.alias("application/jose", "text/plain")

schema = schemathesis.pytest.from_fixture("api")


@schema.exclude(tag=["admin", "audit"]).parametrize()
def test_read_and_inference_operations_conform(case: AnyCase, target: Target) -> None:
    target.count(case.operation.label, case.call_and_validate())


def test_stateful_scenarios_over_inferred_links(api: OpenApiSchema, target: Target) -> None:
    def unserved_model_only(ctx: CheckContext, response: Response, case: AnyCase) -> None:
        """`not_a_server_error`, except the documented 503 of a model a scenario unloaded."""
        if response.status_code < 500:
            return
        name = case.path_parameters.get("name") if case.path_parameters else None
        if response.status_code == 503 and name:
            # The v2 family answers {"error": ...} without a code: ask the v1 catalogue instead.
            with target.client() as client:
                described = client.get(f"/v1/models/{name}")
            if described.status_code == 503 and described.json().get("code") == "model-not-ready":
                return
        raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")

    unloaded: set[str] = set()
    # The scenarios are about a model's life (list, describe, load, unload, predict, infer). The
    # outcome operations get their links from data earlier tests leave behind, which changed the
    # draws from run to run (once no scenario unloaded a model); the fuzzing phase covers them.
    lifecycle = api.exclude(operation_id=["recordFeedback", "getModelPerformance"])

    class Scenarios(lifecycle.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Each scenario starts with every model serving, whatever the previous one unloaded.
            with target.client() as client:
                while unloaded:
                    assert client.post(f"/v1/admin/models/{unloaded.pop()}/load").status_code == 200

        def after_call(self, response: Response, case: AnyCase) -> None:
            super().after_call(response, case)  # records the step for schemathesis' stateful checks
            target.count(f"{case.operation.label} (stateful)", response)
            if case.operation.label.endswith("/unload") and response.status_code == 204:
                unloaded.add(case.path_parameters["name"])

        def validate_response(
            self, response: Response, case: AnyCase, additional_checks: list[Any] | None = None, **kwargs: Any
        ) -> None:
            case.validate_response(
                response,
                excluded_checks=[not_a_server_error],
                additional_checks=[unserved_model_only],
                transport_kwargs=kwargs,
                recorder=self.recorder,
            )

    Scenarios.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            database=None,
            derandomize=not EXPLORING,
            # Scenario draws interleave with HTTP calls, which Hypothesis would count as slow generation.
            suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much],
        )
    )


@schema.include(tag="admin").parametrize()
def test_admin_operations_conform(case: AnyCase, target: Target) -> None:
    target.count(case.operation.label, case.call_and_validate())


@schema.include(tag="audit").parametrize()
def test_audit_operations_conform_over_the_trail_the_others_wrote(case: AnyCase, target: Target) -> None:
    target.count(case.operation.label, case.call_and_validate())


def test_every_operation_was_fuzzed_and_the_service_is_still_sound(
    api: OpenApiSchema, target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    total = sum(target.cases.values())
    tally = target.tally()
    operations = {result.ok().label for result in api.get_all_operations() if isinstance(result, Ok)}
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(operations)} operations (seed {SEED})")
    assert operations <= set(target.cases), f"never fuzzed: {sorted(operations - set(target.cases))}"
    assert total >= MIN_TOTAL_CASES, tally
    stateful = {label for label in target.cases if label.endswith("(stateful)")}
    assert any("/unload" in label for label in stateful), f"no stateful scenario unloaded a model: {sorted(stateful)}"
    assert any("/predict" in label or "/infer" in label for label in stateful), sorted(stateful)

    with target.client() as client:
        for name in MODELS:
            assert client.post(f"/v1/admin/models/{name}/load").status_code == 200
        assert client.get("/readyz").status_code == 200
        verified = client.get("/v1/audit/verify").json()
        assert verified["valid"], verified

    time.sleep(0.5)  # the access log line of the last request is written after its answer
    records = [json.loads(line) for line in target.served.log_lines() if line.startswith("{")]
    assert sum(r.get("event") == "http.request" for r in records) >= total, "the access log is incomplete"
    # The only server errors allowed are the 503s of models the scenarios unloaded.
    errors = [
        r
        for r in records
        if r["level"] in {"error", "critical"}
        and not (r.get("event") == "http.error" and r.get("code") == "model-not-ready")
    ]
    assert not errors, errors[:5]
    unavailable = [r for r in records if r.get("event") == "http.request" and r["status"] >= 500]
    assert all(r["status"] == 503 for r in unavailable), unavailable[:5]


# What the fuzzing found, pinned: each of these failed before its fix, whatever the seed draws.


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/audit/events", {"until": "0.5"}),  # was read as Unix time, not the documented RFC 3339
        ("/v1/audit/export", {"until": "0.5"}),
        ("/v1/audit/events", {"since": "2026-11-28T13:05:12"}),  # no offset: another instant per server
        ("/v1/audit/events", {"cursor": "9" * 19}),  # past PostgreSQL's bigint: was a 500
        ("/v1/audit/events", {"actor": "his\x00epic"}),  # NUL, which PostgreSQL refuses in text: was a 500
        ("/v1/audit/export", {"actor": "his\x00epic"}),  # the same, after a 200 had been sent
        ("/v1/audit/events", {"action": "inference\n"}),
        ("/v1/audit/events", {"model": "CXR Pneumonia"}),
    ],
)
def test_audit_filters_outside_the_document_are_refused(target: Target, path: str, query: dict[str, str]) -> None:
    with target.client() as client:
        response = client.get(path, params=query)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_audit_filters_take_rfc3339_times_with_an_offset(target: Target) -> None:
    with target.client() as client:
        response = client.get("/v1/audit/events", params={"since": "2000-01-01T00:00:00Z", "limit": 1})
        assert response.status_code == 200
        assert len(response.json()["events"]) == 1


@pytest.mark.parametrize(
    "registration",
    [
        {"scopes": ["infer"], "encryption_jwk": {"kty": "EC"}},
        {"scopes": ["infer"], "encryption_jwk": {"kty": "OKP", "crv": "X25519", "x": "A" * 43}},
        {"scopes": ["infer"], "signing_jwk": {"kty": "RSA", "n": 1, "e": []}},
        {"scopes": ["infer"], "encryption_jwk": {"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "d": "d"}},
    ],
)
def test_clients_register_only_keys_the_service_can_use(target: Target, registration: dict[str, Any]) -> None:
    """An unusable encryption key was stored (201), and every sealed answer to that client was a 500."""
    with target.client() as client:
        response = client.post("/v1/admin/clients", json={"client_id": "his-keys", **registration})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"][:2] in (["body", "encryption_jwk"], ["body", "signing_jwk"])


def test_readiness_while_nothing_serves_is_the_documented_report(api: OpenApiSchema, target: Target) -> None:
    """The document said problem+json for /readyz 503; the service answers its readiness report."""
    readiness = api["/readyz"]["GET"]
    with target.client() as client:
        for name in MODELS:
            assert client.post(f"/v1/admin/models/{name}/unload").status_code == 204
        try:
            case = readiness.Case()
            response = case.call()
            assert response.status_code == 503
            case.validate_response(response, excluded_checks=[not_a_server_error])
            assert response.json()["checks"]["models"] is False
        finally:
            for name in MODELS:
                assert client.post(f"/v1/admin/models/{name}/load").status_code == 200
