"""The one path every transport takes into the models: look up, check, batch, run.

It knows no transport and does no I/O of its own; the transports decode payloads into tensors
(or, later, studies and records) and encode what comes back.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from app.audit.recorder import AuditWriter
from app.domain import AuditRecord, RequestContext
from app.errors import AuditUnavailableError, ErrorKind, MedinferError
from app.inference.batcher import BatcherPool, Tensors
from app.inference.registry import ModelRegistry, ServedVersion
from app.inference.tensors import check_inputs
from app.observability.metrics import Metrics
from app.parsing.fhir import ExtractedFeatures, feature_map, from_bundle, from_features, parse_features_json
from app.postprocess.classification import Classification, classify

log = logging.getLogger(__name__)

#: Outputs up to this many values are kept in the audit event (class probabilities, not maps).
AUDITED_OUTPUT_VALUES = 1024


def outputs_sha256(outputs: Mapping[str, npt.NDArray[np.generic]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(outputs):
        array = np.ascontiguousarray(outputs[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes() if array.dtype != object else repr(array.tolist()).encode())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class TensorResult:
    """The outputs of one request and the exact version that produced them."""

    served: ServedVersion
    outputs: Tensors


@dataclass(frozen=True, slots=True)
class RecordPrediction:
    served: ServedVersion
    classification: Classification
    features: ExtractedFeatures


class Pipeline:
    def __init__(
        self, registry: ModelRegistry, batchers: BatcherPool, audit: AuditWriter | None, metrics: Metrics
    ) -> None:
        """``audit`` is None only when auditing is switched off for a benchmark baseline."""
        self.registry = registry
        self.batchers = batchers
        self.audit = audit
        self.metrics = metrics

    async def infer_tensors(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        deadline: float | None,
        context: RequestContext,
    ) -> TensorResult:
        """Run raw tensors through the batcher of the version serving now, then audit.

        The version is resolved once, so a reload during the request cannot mix versions. The
        result is returned only after its audit event is committed (fail closed).
        """
        served: ServedVersion | None = None
        try:
            served = self.registry.get(model, version)
            tensors = check_inputs(served.spec, inputs)
            outputs = await self.batchers.get(served).infer(tensors, deadline)
        except MedinferError as exc:
            await self._record_failure(context, model, served, exc)
            raise
        await self.record(self._inference_record(context, served, outputs))
        return TensorResult(served=served, outputs=outputs)

    async def predict_record(
        self,
        model: str,
        *,
        body: bytes,
        kind: Literal["fhir", "features"],
        deadline: float | None,
        context: RequestContext,
        operating_point: str | None = None,
    ) -> RecordPrediction:
        """An EHR record (FHIR Bundle or plain features) -> features -> probabilities -> decision.

        Audited like any inference, with the Patient's identifier as a pseudonym.
        """
        served = self.registry.get(model)
        started = time.perf_counter()
        fmap = feature_map(served.spec.preprocessing)
        features = from_bundle(body, fmap) if kind == "fhir" else from_features(parse_features_json(body), fmap)
        self.metrics.preprocess_seconds.labels(model=model, version=served.version).observe(
            time.perf_counter() - started
        )
        (tensor,) = served.spec.inputs
        vector = np.asarray([features.values], dtype=np.float32)
        result = await self.infer_tensors(
            model, served.version, {tensor.name: vector}, deadline, replace(context, patient_id=features.patient_id)
        )
        probabilities = result.outputs[result.served.spec.outputs[0].name][0]
        decision = classify(result.served.spec, probabilities.tolist(), operating_point)
        self.metrics.predictions.labels(model=model, version=result.served.version, label=decision.label).inc()
        return RecordPrediction(served=result.served, classification=decision, features=features)

    async def record(self, record: AuditRecord) -> None:
        """Commit one audit event (raises :class:`AuditUnavailableError` if it cannot be)."""
        if self.audit is not None:
            await self.audit.record(record)

    @staticmethod
    def _inference_record(context: RequestContext, served: ServedVersion, outputs: Tensors) -> AuditRecord:
        small = {
            name: array.tolist()
            for name, array in outputs.items()
            if array.dtype != object and array.size <= AUDITED_OUTPUT_VALUES
        }
        return AuditRecord(
            action="inference",
            outcome="success",
            request_id=context.request_id,
            actor=context.actor,
            source_ip=context.source_ip,
            model=served.spec.name,
            model_version=served.version,
            model_sha256=served.sha256,
            input_sha256=context.input_sha256,
            output_sha256=outputs_sha256(outputs),
            patient_id=context.patient_id,
            study_uid=context.study_uid,
            series_uid=context.series_uid,
            sop_uids=context.sop_uids,
            detail={"outputs": small},
        )

    async def _record_failure(
        self, context: RequestContext, model: str, served: ServedVersion | None, error: MedinferError
    ) -> None:
        record = AuditRecord(
            action="inference",
            outcome="error" if error.kind in {ErrorKind.INTERNAL, ErrorKind.UNAVAILABLE} else "failure",
            request_id=context.request_id,
            actor=context.actor,
            source_ip=context.source_ip,
            model=model,
            model_version=served.version if served else None,
            model_sha256=served.sha256 if served else None,
            input_sha256=context.input_sha256,
            patient_id=context.patient_id,
            study_uid=context.study_uid,
            detail={"error_code": error.code},
        )
        try:
            await self.record(record)
        except AuditUnavailableError:
            # The request fails anyway and carries no result; its own error is the better answer.
            log.warning("failure event not audited", extra={"event": "audit.failure_unrecorded", "code": error.code})

    def retire_unserved(self) -> None:
        """After a reload or unload: drain and stop the batchers of versions that left service."""
        self.batchers.retire_unserved(self.registry.all_served())
