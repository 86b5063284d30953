"""FHIR export of audit rows, including events refused before a model version was resolved."""

from __future__ import annotations

from datetime import UTC, datetime

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from app.audit.export import to_fhir
from app.tables import AuditEvent


def _row(**fields: object) -> AuditEvent:
    base: dict[str, object] = {
        "seq": 7,
        "occurred_at": datetime(2026, 11, 29, 3, 0, tzinfo=UTC),
        "request_id": "r-1",
        "action": "infer",
        "outcome": "failure",
        "actor": "client-a",
        "detail": "{}",
        "prev_hash": "0" * 64,
        "hash": "1" * 64,
        "mac": "2" * 64,
    }
    return AuditEvent(**(base | fields))


def test_a_model_without_a_resolved_version_exports_as_valid_fhir() -> None:
    # An unknown version is refused before a sha256 is known: FHIR forbids an empty valueString.
    resource = to_fhir(_row(model="heart-disease"))
    FhirAuditEvent.model_validate(resource)
    (model,) = [e for e in resource["entity"] if e["type"]["code"] == "2"]
    assert model["what"] == {"display": "heart-disease"}
    assert "detail" not in model


def test_a_resolved_model_names_its_version_and_sha256() -> None:
    resource = to_fhir(
        _row(model="heart-disease", model_version="3", model_sha256="a" * 64, input_sha256="b" * 64, outcome="success")
    )
    (model,) = [e for e in resource["entity"] if e["type"]["code"] == "2"]
    assert model["what"] == {"display": "heart-disease v3"}
    assert model["detail"] == [
        {"type": "sha256", "valueString": "a" * 64},
        {"type": "input-sha256", "valueString": "b" * 64},
    ]
    assert resource["outcome"] == "0"
