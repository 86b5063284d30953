"""The one path every transport takes into the models: look up, check, batch, run.

It knows no transport and does no I/O of its own; the transports decode payloads into tensors
(or, later, studies and records) and encode what comes back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from app.audit.recorder import AuditWriter
from app.domain import AuditRecord, RequestContext
from app.errors import (
    AuditUnavailableError,
    ErrorKind,
    InvalidRequestError,
    MedinferError,
    ModelSpecError,
    StudyMismatchError,
)
from app.inference.batcher import BatcherPool, BatchTiming, Tensors
from app.inference.registry import ModelRegistry, ServedVersion
from app.inference.spec import ExplainSpec, ModelSpec
from app.inference.tensors import check_inputs
from app.observability.drift import DriftMonitor, references_from_preprocessing
from app.observability.metrics import Metrics
from app.parsing.dicom import AcceptPolicy, DicomInstance, check_policy
from app.parsing.fhir import (
    ExtractedFeatures,
    FeatureMap,
    feature_map,
    from_bundle,
    from_features,
    parse_features_json,
)
from app.postprocess.classification import Classification, classify, suspicion
from app.postprocess.explain import Contributions, baseline_vector, shapley
from app.postprocess.ood import OodAssessment, assess_image, assess_record
from app.preprocess.pixels import PixelRecipe, to_tensor

log = logging.getLogger(__name__)

#: Outputs up to this many values are kept in the audit event (class probabilities, not maps).
AUDITED_OUTPUT_VALUES = 1024

#: Bodies up to this size are parsed on the event loop (a typical Bundle or v2 request, about a
#: millisecond at most; a thread hop would cost more). Larger ones, hostile ones among them, are
#: parsed in a thread, so that the event loop never waits long on one request's JSON.
INLINE_PARSE_BYTES = 8 * 1024


def _record_features(body: bytes, kind: Literal["fhir", "features"], fmap: FeatureMap) -> ExtractedFeatures:
    return from_bundle(body, fmap) if kind == "fhir" else from_features(parse_features_json(body), fmap)


def outputs_sha256(outputs: Mapping[str, npt.NDArray[np.generic]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(outputs):
        array = np.ascontiguousarray(outputs[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes() if array.dtype != object else repr(array.tolist()).encode())
    return digest.hexdigest()


#: Sees a version's outputs before they are audited; returns what the audit event adds.
Judge = Callable[[ServedVersion, Tensors], Mapping[str, object]]


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
    explanation: Contributions | None = None


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """One image's decision; with an explanation asked for, its class activation map (in the
    model's map resolution) and the preprocessed image the map belongs to."""

    sop_instance_uid: str
    series_uid: str
    classification: Classification
    saliency: npt.NDArray[np.float32] | None = None
    image: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class StudyPrediction:
    """One study's images through one model version.

    The study's decision is that of its most suspicious image: the highest probability of the
    positive label (or, for models without one, the most confident image).
    """

    served: ServedVersion
    classification: Classification
    instances: tuple[InstanceResult, ...]
    study_uid: str
    preprocess_ms: float
    queue_ms: float
    inference_ms: float

    @property
    def most_suspicious(self) -> InstanceResult:
        """The image the study's decision comes from (when none is outside the validated input)."""
        return _most_suspicious(self.instances)


@dataclass(frozen=True, slots=True)
class ImagingRecipe:
    policy: AcceptPolicy
    pixels: PixelRecipe


def _stack(instances: Sequence[DicomInstance], recipe: PixelRecipe) -> npt.NDArray[np.float32]:
    return np.stack([to_tensor(instance.dataset, recipe) for instance in instances]).astype(np.float32, copy=False)


def _most_suspicious(results: Sequence[InstanceResult]) -> InstanceResult:
    return max(results, key=lambda result: suspicion(result.classification))


class Pipeline:
    def __init__(
        self,
        registry: ModelRegistry,
        batchers: BatcherPool,
        audit: AuditWriter | None,
        metrics: Metrics,
        monitor: DriftMonitor | None = None,
        *,
        decode_slots: int | None = None,
    ) -> None:
        """``audit`` is None only when auditing is switched off for a benchmark baseline;
        ``monitor`` watches inputs and outputs for drift (None: not watched); ``decode_slots``
        is how many images may be decoded at once (the container derives it from the memory the
        process may use, :func:`app.preprocess.memory.decode_concurrency`; None: one per CPU)."""
        self.registry = registry
        self.batchers = batchers
        self.audit = audit
        self.metrics = metrics
        self.monitor = monitor
        self._recipes: dict[tuple[str, str, str], ImagingRecipe] = {}
        # A decode at the pixel cap costs gigabytes: only as many at once as memory allows, off the loop.
        self._decode_slots = asyncio.Semaphore(max(1, decode_slots or os.cpu_count() or 1))

    def imaging_recipe(self, served: ServedVersion) -> ImagingRecipe:
        """The allow-lists and pixel recipe of a DICOM model (cached per version)."""
        key = (served.spec.name, served.version, served.sha256)
        recipe = self._recipes.get(key)
        if recipe is None:
            if served.spec.preprocessing.get("kind") != "dicom":
                raise InvalidRequestError(f"model {served.spec.name} does not read DICOM images")
            recipe = ImagingRecipe(
                AcceptPolicy.from_preprocessing(served.spec.preprocessing),
                PixelRecipe.from_preprocessing(served.spec.preprocessing, served.spec.inputs[0].shape),
            )
            self._recipes[key] = recipe
        return recipe

    async def predict_study(
        self,
        model: str,
        instances: Sequence[DicomInstance],
        *,
        deadline: float | None,
        context: RequestContext,
        operating_point: str | None = None,
        explain: bool = False,
    ) -> StudyPrediction:
        """DICOM instances of one study -> allow-lists -> pixels -> probabilities -> decision.

        Refusals before the model runs are audited as failures too. Studies larger than the
        model's batch run as several audited inferences, each naming its own instances. With
        ``explain``, each image keeps its class activation map (the model must declare one).
        """
        served: ServedVersion | None = None
        try:
            served = self.registry.get(model)
            recipe = self.imaging_recipe(served)
            cam = _explainer(served, "cam").output if explain else None
            study_uid = _one_study(instances)
            for instance in instances:
                check_policy(instance, recipe.policy)
            if operating_point is not None:
                classify(served.spec, [0.0] * len(served.spec.labels), operating_point)
            started = time.perf_counter()
            async with self._decode_slots:
                batch = await asyncio.to_thread(_stack, instances, recipe.pixels)
            preprocess_s = time.perf_counter() - started
        except MedinferError as exc:
            await self._record_failure(_study_context(context, instances), model, served, exc)
            raise
        self.metrics.preprocess_seconds.labels(model=model, version=served.version).observe(preprocess_s)
        (tensor,) = served.spec.inputs
        step = served.spec.batching.max_batch_size
        results: list[InstanceResult] = []
        timing = BatchTiming()
        for start in range(0, len(instances), step):
            chunk = instances[start : start + step]
            images = batch[start : start + step]
            decisions: list[Classification] = []
            result = await self.infer_tensors(
                model,
                served.version,
                {tensor.name: images},
                deadline,
                _study_context(context, chunk),
                timing=timing,
                judge=_image_judge(images, decisions, operating_point, explained="cam" if explain else None),
            )
            served = result.served
            maps = result.outputs[cam] if cam is not None else [None] * len(chunk)
            for instance, decision, saliency, image in zip(chunk, decisions, maps, images, strict=True):
                results.append(
                    InstanceResult(
                        instance.sop_instance_uid,
                        instance.series_uid,
                        decision,
                        saliency=None if saliency is None else np.asarray(saliency, dtype=np.float32),
                        image=None if saliency is None else image[0],
                    )
                )
            if self.monitor is not None:
                for instance_result in results[start:]:
                    self.monitor.observe_image(model, served.version, instance_result.classification.probabilities)
        if explain:
            self.metrics.explanations.labels(model=model, version=served.version, method="cam").inc()
        study = _study_decision(served.spec, results)
        self._count_decision(served, study)
        return StudyPrediction(
            served=served,
            classification=study,
            instances=tuple(results),
            study_uid=study_uid,
            preprocess_ms=preprocess_s * 1000,
            queue_ms=timing.queue_s * 1000,
            inference_ms=timing.compute_s * 1000,
        )

    def _count_decision(self, served: ServedVersion, decision: Classification) -> None:
        name = served.spec.name
        self.metrics.predictions.labels(model=name, version=served.version, label=decision.label).inc()
        if decision.ood is not None:
            for reason in decision.ood.reasons:
                self.metrics.indeterminate.labels(model=name, version=served.version, reason=reason.value).inc()

    async def infer_tensors(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        deadline: float | None,
        context: RequestContext,
        *,
        timing: BatchTiming | None = None,
        judge: Judge | None = None,
    ) -> TensorResult:
        """Run raw tensors through the batcher of the version serving now, then audit.

        The version is resolved once, so a reload during the request cannot mix versions. The
        result is returned only after its audit event is committed (fail closed). ``judge`` sees
        the outputs before the audit event is written, and what it returns (the safety verdict)
        is audited with them.
        """
        served: ServedVersion | None = None
        try:
            served = self.registry.get(model, version)
            tensors = check_inputs(served.spec, inputs)
            outputs = await self.batchers.get(served).infer(tensors, deadline, timing)
        except MedinferError as exc:
            await self._record_failure(context, model, served, exc)
            raise
        extra = judge(served, outputs) if judge is not None else {}
        await self.record(self._inference_record(context, served, outputs, extra))
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
        explain: bool = False,
    ) -> RecordPrediction:
        """An EHR record (FHIR Bundle or plain features) -> features -> probabilities -> decision.

        Audited like any inference, with the Patient's identifier as a pseudonym. With
        ``explain``, exact Shapley contributions of each feature against the model's declared
        baseline come with the decision (computed before the answer, audited with it).
        """
        served = self.registry.get(model)
        explainer = _explainer(served, "shapley") if explain else None
        if operating_point is not None:  # an unknown one is refused before anything runs or is audited
            classify(served.spec, [0.0] * len(served.spec.labels), operating_point)
        started = time.perf_counter()
        fmap = feature_map(served.spec.preprocessing)
        try:
            if len(body) <= INLINE_PARSE_BYTES:
                features = _record_features(body, kind, fmap)
            else:  # a large (or hostile) record is parsed off the event loop
                features = await asyncio.to_thread(_record_features, body, kind, fmap)
        except MedinferError as exc:
            # A refused record is part of the trail too: who sent what (its digest) and why it
            # was refused, by code only; nothing of the record itself.
            await self._record_failure(context, model, served, exc)
            raise
        self.metrics.preprocess_seconds.labels(model=model, version=served.version).observe(
            time.perf_counter() - started
        )
        (tensor,) = served.spec.inputs
        vector = np.asarray([features.values], dtype=np.float32)
        assessment = assess_record(
            served.spec.ood_of(served.version), features.names, features.values, features.imputed
        )
        contributions = None
        if explainer is not None and not (assessment is not None and assessment.outside):
            # An indeterminate answer shows no probability, so there is nothing to explain.
            contributions = await asyncio.to_thread(_shapley, served, explainer, vector, features.names)
        decided: list[Classification] = []

        def judge(version: ServedVersion, outputs: Tensors) -> Mapping[str, object]:
            probabilities = outputs[version.spec.outputs[0].name][0]
            decided.append(classify(version.spec, probabilities.tolist(), operating_point, assessment))
            return {
                **_safety_detail([assessment]),
                "decision": _decision_detail(decided[0]),
                **_explanation_detail(explainer),
            }

        result = await self.infer_tensors(
            model,
            served.version,
            {tensor.name: vector},
            deadline,
            replace(context, patient_id=features.patient_id),
            judge=judge,
        )
        (decision,) = decided
        self._count_decision(result.served, decision)
        if explainer is not None:
            self.metrics.explanations.labels(model=model, version=served.version, method="shapley").inc()
        if self.monitor is not None:
            self.monitor.observe_record(
                model,
                served.version,
                names=features.names,
                values=features.values,
                imputed=features.imputed,
                probabilities=decision.probabilities,
            )
        return RecordPrediction(
            served=result.served, classification=decision, features=features, explanation=contributions
        )

    async def record(self, record: AuditRecord) -> None:
        """Commit one audit event (raises :class:`AuditUnavailableError` if it cannot be)."""
        if self.audit is not None:
            await self.audit.record(record)

    @staticmethod
    def _inference_record(
        context: RequestContext, served: ServedVersion, outputs: Tensors, extra: Mapping[str, object]
    ) -> AuditRecord:
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
            detail={"outputs": small, **extra},
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
        served = self.registry.all_served()
        serving = {(s.spec.name, s.version, s.sha256) for s in served}
        self._recipes = {k: v for k, v in self._recipes.items() if k in serving}
        self.batchers.retire_unserved(served)
        self.watch_served()

    def watch_served(self) -> None:
        """Point the drift monitor at exactly the versions serving now (after a load or reload):
        each with the training reference its ``model.toml`` declares."""
        if self.monitor is None:
            return
        watched = []
        for served in self.registry.all_served():
            try:
                references = references_from_preprocessing(served.spec.preprocessing)
            except ModelSpecError as exc:  # the model serves; only its drift goes unwatched, and the log says so
                log.warning(
                    "drift reference refused",
                    extra={"event": "drift.reference_refused", "model": served.spec.name, "code": exc.code},
                )
                continue
            watched.append((served.spec.name, served.version, references))
        self.monitor.sync(watched)


def _image_judge(
    images: npt.NDArray[np.float32],
    into: list[Classification],
    operating_point: str | None,
    *,
    explained: str | None,
) -> Judge:
    """Decides a chunk of images from the outputs they produced (the detector's verdict first),
    before the audit event is written; the decisions land in ``into``. The event keeps the
    verdicts and the chunk's most suspicious decision, which outcome feedback later judges."""

    def judge(served: ServedVersion, outputs: Tensors) -> Mapping[str, object]:
        verdicts = _image_assessments(served, outputs, images)
        rows = outputs[served.spec.outputs[0].name]
        into.extend(
            classify(served.spec, row.tolist(), operating_point, verdict)
            for row, verdict in zip(rows, verdicts, strict=True)
        )
        worst = max(into, key=suspicion)
        detail: dict[str, object] = {**_safety_detail(verdicts), "decision": _decision_detail(worst)}
        if explained:
            detail["explanation"] = {"method": explained}
        return detail

    return judge


def _decision_detail(decision: Classification) -> dict[str, object]:
    """What outcome feedback judges later: the label given, at which threshold and operating point."""
    return {"label": decision.label, "threshold": decision.threshold, "operating_point": decision.operating_point}


def _explainer(served: ServedVersion, method: str) -> ExplainSpec:
    """The model's declared explanation of this kind; a 4xx naming what is missing otherwise."""
    explain = served.spec.explains(method)
    if explain is None:
        raise InvalidRequestError(
            f"model {served.spec.name} cannot explain this input: its model.toml declares no "
            f"[explain] with method {method!r}"
        )
    return explain


def _shapley(
    served: ServedVersion, explain: ExplainSpec, vector: npt.NDArray[np.float32], names: Sequence[str]
) -> Contributions:
    """Exact Shapley values over the version's own session (one batched run of the coalitions)."""
    spec = served.spec
    (tensor,) = spec.inputs
    output = spec.outputs[0].name

    def run(batch: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
        result = served.loaded.session.run([output], {tensor.name: batch.astype(np.float32, copy=False)})
        return np.asarray(result[0])

    positive = spec.labels.index(spec.positive_label) if spec.positive_label else len(spec.labels) - 1
    imputation = spec.preprocessing.get("imputation")
    return shapley(
        run,
        vector,
        baseline_vector(explain.baseline, names),
        positive_index=positive,
        space=explain.space,
        names=names,
        # A NaN is played as the value the graph substitutes for it: the same answer, fewer rows.
        imputation=baseline_vector(imputation, names) if isinstance(imputation, Mapping) else None,
    )


def _explanation_detail(explain: ExplainSpec | None) -> dict[str, object]:
    """What the audit event keeps of an explanation: that one was given and how, not its numbers
    (contributions are functions of the patient's values)."""
    return {} if explain is None else {"explanation": {"method": explain.method, "space": explain.space}}


def _image_assessments(
    served: ServedVersion, outputs: Tensors, images: npt.NDArray[np.float32]
) -> list[OodAssessment | None]:
    """One verdict per image: the graph's OOD score (if the version declares one) and content checks."""
    ood = served.spec.ood_of(served.version)
    if ood is None:
        return [None] * len(images)
    scores: list[float | None] = [None] * len(images)
    if ood.output is not None:
        flat = np.asarray(outputs[ood.output], dtype=np.float64).reshape(len(images), -1)
        scores = [float(row[0]) for row in flat]
    return [assess_image(ood, score, image) for score, image in zip(scores, images, strict=True)]


def _safety_detail(assessments: Sequence[OodAssessment | None]) -> dict[str, object]:
    """What the audit event keeps of the verdicts: scores, thresholds and reason codes, no values."""
    judged = [a for a in assessments if a is not None]
    if not judged:
        return {}
    return {
        "ood": [
            {"score": a.score, "threshold": a.threshold, "outside": a.outside, "reasons": [r.value for r in a.reasons]}
            for a in judged
        ]
    }


def _study_decision(spec: ModelSpec, results: Sequence[InstanceResult]) -> Classification:
    """A study is indeterminate when any of its images is: a normal study cannot be claimed from
    the images the model can read while it cannot read another. Otherwise it takes the decision
    of its most suspicious image."""
    verdicts = [r.classification.ood for r in results if r.classification.indeterminate]
    outside = [v for v in verdicts if v is not None]
    if not outside:
        return _most_suspicious(results).classification
    scores = [v.score for v in outside if v.score is not None]
    findings = tuple(dict.fromkeys(f for v in outside for f in v.findings))
    merged = OodAssessment(outside[0].method, max(scores) if scores else None, outside[0].threshold, findings)
    worst = _most_suspicious(results).classification
    return classify(spec, [worst.probabilities[label] for label in spec.labels], worst.operating_point, merged)


def _one_study(instances: Sequence[DicomInstance]) -> str:
    if not instances:
        raise InvalidRequestError("no DICOM instance in the request")
    studies = {i.study_uid for i in instances}
    patients = {i.patient_id or "" for i in instances}
    if len(studies) > 1 or len(patients) > 1:
        raise StudyMismatchError("the instances belong to more than one study or patient; send one study at a time")
    return instances[0].study_uid


def _study_context(context: RequestContext, instances: Sequence[DicomInstance]) -> RequestContext:
    if not instances:
        return context
    series = {i.series_uid for i in instances}
    return replace(
        context,
        patient_id=instances[0].patient_id,
        study_uid=instances[0].study_uid,
        series_uid=next(iter(series)) if len(series) == 1 else None,
        sop_uids=tuple(i.sop_instance_uid for i in instances),
    )
