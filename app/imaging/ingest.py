"""Asynchronous imaging: instances arrive (STOW-RS, C-STORE), settle into studies, are inferred,
and their DICOM SR goes to the PACS outbox.

:meth:`ImagingService.accept` is the one door for both transports. It is synchronous and
thread-safe (pynetdicom calls it from its own threads, STOW-RS from a worker thread): it parses
the instance strictly, picks the model by routing rule, checks the model's allow-lists, and
seals the bytes to the spool with an fsync before it returns. Only then does the transport
answer success, so an instance that was acknowledged survives a crash: :meth:`start` picks up
whatever the spool holds. Refusals raise domain errors that each transport maps to its status.

A study is inferred when no new instance of it arrived for ``MEDINFER_STUDY_SETTLE_S``. If the
model is overloaded or the audit trail is down, the study waits and is tried again; its spool
files are removed only after the SR is committed to the outbox (or the study is refused).

In production, the result of a model marked ``not_for_clinical_use`` (served only because the
operator acknowledged it) is never queued for the PACS: the study is inferred and audited, but
no SR is built or queued, so no outbox state and no ``medinfer outbox requeue`` can release it
as a coded finding. A log line (``imaging.result_withheld``) and
``medinfer_results_withheld_total{destination="pacs"}`` say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydicom.uid import UID

from app.domain import AuditRecord, RequestContext
from app.encoders.dicom_sr import build_sr, sr_bytes
from app.encoders.saliency import saliency_map, sr_reference
from app.errors import AuditUnavailableError, ErrorKind, MedinferError, OutOfResourcesError, StudyMismatchError
from app.imaging.outbox import Outbox
from app.imaging.routing import Router
from app.inference.registry import ClinicalUsePolicy
from app.observability.metrics import Metrics
from app.parsing.dicom import DicomInstance, DicomLimits, check_policy, read_instance
from app.pipeline import Pipeline, StudyPrediction
from app.security.sealed import SealedFileError, SealedFiles

log = logging.getLogger(__name__)

_SUFFIX: Final = ".dcm"
#: Errors after which a settled study is kept and tried again rather than refused.
_RETRYABLE: Final = frozenset({ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED})
MAX_RETRY_DELAY_S: Final = 60.0
#: The audit action of an instance received (C-STORE); STOW-RS audits its request as a whole.
RECEIPT_ACTION: Final = "dicom.store"
#: How long an audited receipt waits for its event's commit; a C-STORE SCU waits about 30 s.
AUDIT_WAIT_S: Final = 10.0
#: Series of the saliency maps; the SR writes its own series at 990 (dicom_sr.build_sr).
SALIENCY_SERIES_NUMBER: Final = 991


@dataclass(frozen=True, slots=True)
class Accepted:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    model: str


def _receipt(
    transport: str, actor: str, instance: DicomInstance | None, model: str | None, error: MedinferError | None
) -> AuditRecord:
    """The ``dicom.store`` event of one received instance. Identifiers go in the fields the
    writer pseudonymises; the detail holds only our own codes and a standard SOP Class UID."""
    detail: dict[str, object] = {"transport": transport}
    if instance is not None:
        detail["sop_class"] = _known_uid(instance.sop_class_uid)
    if error is not None:
        detail["code"] = error.code
    return AuditRecord(
        action=RECEIPT_ACTION,
        outcome="failure" if error is not None else "success",
        actor=actor,
        model=model,
        input_sha256=instance.sha256 if instance is not None else None,
        patient_id=instance.patient_id if instance is not None else None,
        study_uid=instance.study_uid if instance is not None else None,
        series_uid=instance.series_uid if instance is not None else None,
        sop_uids=(instance.sop_instance_uid,) if instance is not None else (),
        detail=detail,
    )


def _known_uid(value: str) -> str:
    """A UID of the standard (a SOP Class) as is; anything else the sender made up is not kept."""
    uid = UID(value)
    return str(uid) if uid.name != str(uid) else "other"


@dataclass(frozen=True, slots=True)
class _Spooled:
    path: Path
    sop_instance_uid: str


@dataclass
class _Study:
    model: str
    study_uid: str
    actor: str
    files: dict[str, _Spooled] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    attempts: int = 0


class ImagingService:
    def __init__(
        self,
        pipeline: Pipeline,
        router: Router,
        spool: SealedFiles,
        outbox: Outbox,
        metrics: Metrics,
        *,
        limits: DicomLimits,
        settle_s: float,
        drain_s: float,
        min_free_bytes: int,
        software_version: str,
        policy: ClinicalUsePolicy | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._policy = policy or ClinicalUsePolicy()
        self._router = router
        self._spool = spool
        self.outbox = outbox
        self._metrics = metrics
        self._limits = limits
        self._settle_s = settle_s
        self._drain_s = drain_s
        self._min_free_bytes = min_free_bytes
        self._software_version = software_version
        self._loop: asyncio.AbstractEventLoop | None = None
        self._studies: dict[tuple[str, str], _Study] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.on_study_done: Callable[[str, str], None] | None = None  # (study key digest, outcome), for tests

    async def start(self) -> None:
        """Bind to the running loop, re-queue what the spool holds, and start the outbox."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._spool.ensure)
        recovered = await asyncio.to_thread(self._spool.names, _SUFFIX)
        for path in recovered:
            try:
                header, encoded = await asyncio.to_thread(self._read_spooled, path)
                instance = await asyncio.to_thread(read_instance, encoded, self._limits)
            except (SealedFileError, MedinferError, OSError, ValueError, TypeError):
                log.warning("unreadable spool file left in place", extra={"event": "imaging.spool_unreadable"})
                continue
            self._add(header["model"], header["actor"], instance.study_uid, _Spooled(path, instance.sop_instance_uid))
        if recovered:
            log.info("spooled instances recovered", extra={"event": "imaging.recovered", "count": len(recovered)})
        self._spawn(self.outbox.run(), "pacs-outbox")

    async def aclose(self) -> None:
        """Infer the studies still waiting, then stop the outbox (called after the transports stop).

        A graceful stop (a rollout, a scale-down) so leaves nothing in the spool of a replica that
        may not come back. A study not done within ``drain_s``, or one the model or audit trail
        cannot take now, stays in the spool for the next start, as after a crash.
        """
        self._closing = True
        waiting, self._studies = self._studies, {}
        self._metrics.studies_waiting.set(0)
        for key, study in waiting.items():
            if study.timer is not None:
                study.timer.cancel()
                study.timer = None
            if study.files:
                self._spawn(self._infer(key, study), "study")
        if waiting:
            log.info("inferring waiting studies", extra={"event": "imaging.drain", "count": len(waiting)})
        studies = [task for task in self._tasks if task.get_name() == "study"]
        if studies:
            _, late = await asyncio.wait(studies, timeout=self._drain_s)
            for task in late:
                task.cancel()  # its spool files stay for the next start
            if late:
                log.warning("studies left in the spool", extra={"event": "imaging.drain_late", "count": len(late)})
        self.outbox.close()
        for task in list(self._tasks):
            if task.get_name() == "pacs-outbox":
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the door ---------------------------------------------------------------------------

    def accept(
        self,
        encoded: bytes,
        *,
        transport: str,
        actor: str,
        expected_study: str | None = None,
        audit: bool = False,
    ) -> Accepted:
        """Check and spool one instance (blocking; any thread but the event loop's). Raises a
        domain error to refuse.

        With ``audit`` (C-STORE), every receipt leaves a ``dicom.store`` audit event, accepted
        or refused. An accepted instance is acknowledged only once its event is committed: if
        the trail cannot take it, the spooled copy is removed and :class:`AuditUnavailableError`
        refuses the instance (a transient failure), so the sender keeps it and sends it again.
        Nothing is lost, and nothing is taken in that the trail does not show. A refusal that
        cannot be audited is refused all the same (and logged).
        """
        instance: DicomInstance | None = None
        model: str | None = None
        try:
            loop = self._loop
            if loop is None or self._closing:
                raise OutOfResourcesError("the imaging service is not running")
            instance = read_instance(encoded, self._limits)
            if expected_study is not None and instance.study_uid != expected_study:
                raise StudyMismatchError("the instance's StudyInstanceUID differs from the study in the request path")
            model = self._router.model_for(instance)
            check_policy(instance, self._pipeline.imaging_recipe(self._pipeline.registry.get(model)).policy)
            path = self._write(encoded, model, actor)
        except MedinferError as exc:
            self._metrics.dicom_instances.labels(transport=transport, outcome=exc.code).inc()
            if audit:
                self._audit_refusal(transport, actor, instance, model, exc)
            raise
        if audit:
            try:
                self._record(_receipt(transport, actor, instance, model, None))
            except MedinferError as exc:
                self._spool.remove(path)
                self._metrics.dicom_instances.labels(transport=transport, outcome=exc.code).inc()
                log.warning(
                    "instance refused: its receipt could not be audited",
                    extra={"event": "imaging.receipt_unaudited", "code": exc.code},
                )
                # A receipt that timed out may still commit later (the writer's queue keeps it): the
                # refusal follows it in the trail, so the trail never ends on an acceptance the
                # sender was told had failed.
                self._audit_refusal(transport, actor, instance, model, exc)
                raise
        loop.call_soon_threadsafe(
            self._add, model, actor, instance.study_uid, _Spooled(path, instance.sop_instance_uid)
        )
        self._metrics.dicom_instances.labels(transport=transport, outcome="accepted").inc()
        return Accepted(instance.sop_class_uid, instance.sop_instance_uid, instance.study_uid, model)

    def _audit_refusal(
        self, transport: str, actor: str, instance: DicomInstance | None, model: str | None, error: MedinferError
    ) -> None:
        try:
            self._record(_receipt(transport, actor, instance, model, error))
        except MedinferError as exc:
            log.warning("refused instance not audited", extra={"event": "imaging.refusal_unaudited", "code": exc.code})

    def _record(self, record: AuditRecord) -> None:
        """Commit ``record`` from a worker thread (pynetdicom's, or STOW's) on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise AuditUnavailableError("the imaging service is not running", retry_after_s=2)
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                msg = "an audited accept() must not run on the event loop: it waits for it"
                raise RuntimeError(msg)
        future = asyncio.run_coroutine_threadsafe(self._pipeline.record(record), loop)
        try:
            future.result(timeout=AUDIT_WAIT_S)
        except TimeoutError:
            future.cancel()
            raise AuditUnavailableError("the audit trail did not answer in time", retry_after_s=2) from None

    def _write(self, encoded: bytes, model: str, actor: str) -> Path:
        header = json.dumps({"model": model, "actor": actor}).encode()
        try:
            self._spool.ensure()
            free = shutil.disk_usage(self._spool.directory).free
            if free - len(encoded) < self._min_free_bytes:
                raise OutOfResourcesError("the DICOM spool is out of disk space")
            name = f"{time.time_ns():020d}-{secrets.token_hex(8)}{_SUFFIX}"
            return self._spool.write(name, header + b"\n" + encoded)
        except OSError as exc:
            log.error(  # noqa: TRY400 - the traceback would say nothing the error class does not
                "spool write failed", extra={"event": "imaging.spool_failed", "error": type(exc).__name__}
            )
            raise OutOfResourcesError("the DICOM spool cannot be written") from exc

    def _read_spooled(self, path: Path) -> tuple[dict[str, str], bytes]:
        header, _, encoded = self._spool.read(path).partition(b"\n")
        parsed = json.loads(header)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), str):
            msg = "spool header"
            raise TypeError(msg)
        return {"model": parsed["model"], "actor": str(parsed.get("actor", "recovered"))}, encoded

    # -- studies (on the event loop) --------------------------------------------------------

    def _add(self, model: str, actor: str, study_uid: str, spooled: _Spooled) -> None:
        key = (study_uid, model)
        study = self._studies.setdefault(key, _Study(model=model, study_uid=study_uid, actor=actor))
        previous = study.files.pop(spooled.sop_instance_uid, None)
        if previous is not None and previous.path != spooled.path:
            self._spool.remove(previous.path)  # a resend of the same instance replaces it
        study.files[spooled.sop_instance_uid] = spooled
        self._schedule(key, study, self._settle_s)
        self._metrics.studies_waiting.set(len(self._studies))

    def _schedule(self, key: tuple[str, str], study: _Study, delay_s: float) -> None:
        if study.timer is not None:
            study.timer.cancel()
        if self._closing or self._loop is None:
            return
        study.timer = self._loop.call_later(delay_s, self._settled, key)

    def _settled(self, key: tuple[str, str]) -> None:
        study = self._studies.pop(key, None)
        self._metrics.studies_waiting.set(len(self._studies))
        if study is not None and study.files:
            study.timer = None
            self._spawn(self._infer(key, study), "study")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _infer(self, key: tuple[str, str], study: _Study) -> None:
        files = list(study.files.values())
        request_id = f"study-{secrets.token_hex(8)}"
        try:
            instances = await asyncio.to_thread(self._load, files)
            prediction = await self._pipeline.predict_study(
                study.model,
                instances,
                explain=self._explains(study.model),
                deadline=None,
                context=RequestContext(
                    actor=study.actor,
                    request_id=request_id,
                    source_ip=None,
                    input_sha256=hashlib.sha256("".join(i.sha256 for i in instances).encode()).hexdigest(),
                ),
            )
            if self._withheld(prediction):
                self._finish(study, files, "withheld")
                return
            for sop_uid, encoded in await asyncio.to_thread(self._results, instances, prediction, request_id):
                await self.outbox.enqueue(sop_uid, encoded)
        except MedinferError as exc:
            if exc.kind in _RETRYABLE:
                if self._closing:
                    self._done(study, f"deferred:{exc.code}")  # its spool files stay for the next start
                else:
                    self._retry(key, study, exc.code)
                return
            self._finish(study, files, exc.code)
            return
        except Exception as exc:  # a study must never take the loop down; its files stay for a restart
            log.exception("study failed", extra={"event": "imaging.study_error", "error": type(exc).__name__})
            self._done(study, "internal-error")
            return
        self._finish(study, files, "inferred")

    def _explains(self, model: str) -> bool:
        """Whether the route asks for an explanation the model can give. A rule that asks a model
        without an activation map must not cost the study its result: it is answered without
        the map, and the log says why."""
        if not self._router.explains(model):
            return False
        if self._pipeline.registry.get(model).spec.explains("cam") is not None:
            return True
        log.warning(
            "routing rule asks for an explanation the model cannot give; the study is answered without one",
            extra={"event": "imaging.explanation_unavailable", "model": model},
        )
        return False

    def _withheld(self, prediction: StudyPrediction) -> bool:
        """True (and logged, counted) if this result must not reach the PACS."""
        served = prediction.served
        if not self._policy.withholds_results(served.spec):
            return False
        log.warning(
            "result withheld from the PACS: the model is not for clinical use",
            extra={
                "event": "imaging.result_withheld",
                "model": served.spec.name,
                "version": served.version,
                "destination": "pacs",
                "reason": "not_for_clinical_use",
            },
        )
        self._metrics.results_withheld.labels(model=served.spec.name, version=served.version, destination="pacs").inc()
        return True

    def _retry(self, key: tuple[str, str], study: _Study, code: str) -> None:
        study.attempts += 1
        delay = min(self._settle_s * 2**study.attempts, MAX_RETRY_DELAY_S)
        log.warning("study deferred", extra={"event": "imaging.study_deferred", "code": code, "retry_in_s": delay})
        pending = self._studies.get(key)
        if pending is not None:  # more instances arrived meanwhile: merge, keep the newest copy of each
            for sop, spooled in study.files.items():
                pending.files.setdefault(sop, spooled)
            return
        self._studies[key] = study
        self._schedule(key, study, delay)
        self._done(study, f"deferred:{code}")

    def _finish(self, study: _Study, files: list[_Spooled], outcome: str) -> None:
        for spooled in files:
            self._spool.remove(spooled.path)
        self._done(study, outcome)

    def _done(self, study: _Study, outcome: str) -> None:
        self._metrics.studies.labels(outcome=outcome.partition(":")[0]).inc()
        log.info("study done", extra={"event": "imaging.study_done", "outcome": outcome})
        if self.on_study_done is not None:
            with contextlib.suppress(Exception):
                self.on_study_done(hashlib.sha256(study.study_uid.encode()).hexdigest()[:16], outcome)

    def _load(self, files: list[_Spooled]) -> list[DicomInstance]:
        return [read_instance(self._read_spooled(f.path)[1], self._limits) for f in files]

    def _results(
        self, instances: list[DicomInstance], prediction: StudyPrediction, request_id: str
    ) -> list[tuple[str, bytes]]:
        """What goes to the PACS, in order: each image's saliency map (when the route asked for
        the explanation), then the SR that references them, so the SR never points at an object
        the PACS does not have yet. An image outside the validated input gets no map: the map of
        an input the model cannot read is not evidence of anything."""
        sources = {i.sop_instance_uid: i.dataset for i in instances}
        explained = [
            (r.sop_instance_uid, r.saliency)
            for r in prediction.instances
            if r.saliency is not None and not r.classification.indeterminate
        ]
        maps = [
            saliency_map(
                sources[sop_uid],
                saliency,
                prediction.served,
                series_number=SALIENCY_SERIES_NUMBER,
                instance_number=number,
                software_version=self._software_version,
            )
            for number, (sop_uid, saliency) in enumerate(explained, start=1)
        ]
        sr = build_sr(
            [i.dataset for i in instances],
            prediction.served,
            prediction.classification,
            request_id=request_id,
            software_version=self._software_version,
            extra_items=[sr_reference(seg) for seg in maps],
            extra_evidence=maps,
        )
        return [(str(seg.SOPInstanceUID), sr_bytes(seg)) for seg in maps] + [(str(sr.SOPInstanceUID), sr_bytes(sr))]
