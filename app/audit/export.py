"""Audit events as FHIR R4 AuditEvent resources (IHE BALP shape), one JSON object per line."""

from __future__ import annotations

import json
from typing import Any, Final

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from app.audit.chain import utc_text
from app.tables import AuditEvent

_OUTCOME: Final = {"success": "0", "failure": "4", "error": "8"}
_ACTION_TYPE: Final = "urn:medinfer:audit-action"


def to_fhir(row: AuditEvent) -> dict[str, Any]:
    """One event as a validated FHIR R4B AuditEvent (pseudonyms only; never clear identifiers)."""
    entities: list[dict[str, Any]] = []
    if row.patient_pseudonym:
        entities.append(
            {
                "what": {"identifier": {"system": "urn:medinfer:pseudonym:patient", "value": row.patient_pseudonym}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
            }
        )
    if row.model:
        # FHIR strings may not be empty: an event refused before a model version was resolved
        # (say, an unknown version) names the model only.
        details = [{"type": "sha256", "valueString": row.model_sha256}] if row.model_sha256 else []
        if row.input_sha256:
            details.append({"type": "input-sha256", "valueString": row.input_sha256})
        if row.output_sha256:
            details.append({"type": "output-sha256", "valueString": row.output_sha256})
        entities.append(
            {
                "what": {"display": f"{row.model} v{row.model_version}" if row.model_version else row.model},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
                **({"detail": details} if details else {}),
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row.seq),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": _ACTION_TYPE, "code": row.action}],
        "action": "E",
        "recorded": utc_text(row.occurred_at),
        "outcome": _OUTCOME.get(row.outcome, "8"),
        "agent": [
            {
                "who": {"identifier": {"system": "urn:medinfer:client", "value": row.actor or "anonymous"}},
                "requestor": True,
                **({"network": {"address": row.source_ip, "type": "2"}} if row.source_ip else {}),
            }
        ],
        "source": {
            "observer": {"display": "medinfer"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}],
        },
        "entity": entities,
    }
    if row.request_id:
        resource["outcomeDesc"] = f"request {row.request_id}"
    FhirAuditEvent.model_validate(resource)
    return resource


def to_ndjson_line(row: AuditEvent) -> bytes:
    return json.dumps(to_fhir(row), separators=(",", ":")).encode() + b"\n"
