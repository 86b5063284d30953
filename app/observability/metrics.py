"""Every Prometheus metric of the service, defined here and nowhere else.

Metrics live on a registry owned by the :class:`Metrics` object (built by the container), not
on prometheus_client's global one, so two apps in one process (tests) never collide. Labels
carry route templates, model names and versions, outcomes; never patient, study or request ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.domain import VersionState, VersionStatus

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ModelStatusCollector(Collector):
    """Reads the registry at scrape time, so the gauge can never disagree with it."""

    def __init__(self, source: Callable[[], Iterable[VersionStatus]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "medinfer_model_version_ready",
            "1 if the model version serves, 0 if it was refused or failed to load.",
            labels=["model", "version"],
        )
        provider = GaugeMetricFamily(
            "medinfer_model_execution_provider_info",
            "Execution providers a serving version's session actually loaded.",
            labels=["model", "version", "provider"],
        )
        for status in self._source():
            ready.add_metric([status.model, status.version], 1.0 if status.state is VersionState.READY else 0.0)
            for name in status.providers:
                provider.add_metric([status.model, status.version, name], 1.0)
        yield ready
        yield provider


class _GpuCollector(Collector):
    """NVML readings at scrape time. Created only when NVML initialises (a GPU and driver exist)."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    @classmethod
    def create(cls) -> _GpuCollector | None:
        try:
            import pynvml  # noqa: PLC0415 - optional: only nodes with an NVIDIA driver have it working

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no library, no driver or no GPU: the metrics stay absent
            return None
        return cls(pynvml)

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        utilisation = GaugeMetricFamily(
            "medinfer_gpu_utilization_ratio", "GPU compute utilisation (0-1).", labels=["gpu"]
        )
        memory = GaugeMetricFamily("medinfer_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            utilisation.add_metric([str(index)], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            memory.add_metric([str(index)], float(nvml.nvmlDeviceGetMemoryInfo(handle).used))
        yield utilisation
        yield memory


class _KeyExpiryCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "medinfer_key_expiry_timestamp_seconds",
            "When each published JWE key (active or next) is due for rotation, as a Unix time.",
            labels=["kid"],
        )
        for kid, expires in self._source():
            gauge.add_metric([kid], expires)
        yield gauge


class _BuildInfo(Collector):
    def __init__(self, version: str) -> None:
        self._version = version

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("medinfer_build", "Service version.")
        info.add_metric([], {"version": self._version})
        yield info


class Metrics:
    """The service's metrics on their own registry.

    With several uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` is set (``medinfer serve`` does
    it) and counters, histograms and gauges live in files there; :meth:`exposition` then merges
    every worker's values, so any worker's ``/metrics`` shows the service's totals. Collectors
    that read this process's state (model versions, GPUs, build) are added as they are.
    """

    def __init__(self, version: str = "unknown") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._local: list[Collector] = [_BuildInfo(version)]
        self._model_collector: _ModelStatusCollector | None = None
        self.registry.register(self._local[0])
        self.http_requests = Counter(
            "medinfer_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "medinfer_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_requests = Counter(
            "medinfer_inference_requests_total",
            "Inference requests by model, version and outcome (ok, error, rejected, deadline).",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "medinfer_inference_queue_seconds",
            "Time a request waited in its model's batch queue.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "medinfer_inference_compute_seconds",
            "Time of one batched session run, stacking and slicing included.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "medinfer_inference_batch_size",
            "Rows per executed batch.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "medinfer_inference_queue_depth",
            "Requests waiting in a model version's batch queue.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.audit_write_seconds = Histogram(
            "medinfer_audit_write_seconds",
            "Time of one audit transaction (a group of events committed together).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "medinfer_audit_write_failures_total",
            "Audit events that could not be committed (their results were withheld).",
            registry=self.registry,
        )
        self.preprocess_seconds = Histogram(
            "medinfer_inference_preprocess_seconds",
            "Time to turn a payload (FHIR record, DICOM study) into model inputs.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "medinfer_predictions_total",
            "Decisions by model, version and predicted label, for clinical drift watching.",
            ["model", "version", "label"],
            registry=self.registry,
        )
        self.indeterminate = Counter(
            "medinfer_indeterminate_total",
            "Answers given without a label decision because the input lay outside the model's validated input, "
            "by reason: ood_score, content (blank, constant or saturated image), feature_range, imputed.",
            ["model", "version", "reason"],
            registry=self.registry,
        )
        self.models_refused = Counter(
            "medinfer_model_versions_refused_total",
            "Model versions not served by policy (not_acknowledged: a not-for-clinical-use version in production "
            "that the operator has not acknowledged).",
            ["model", "version", "reason"],
            registry=self.registry,
        )
        self.results_withheld = Counter(
            "medinfer_results_withheld_total",
            "Results kept from a PACS or HIS as a coded finding because the model is not for clinical use, or "
            "because no routing rule enables the model, by destination (pacs, his).",
            ["model", "version", "destination"],
            registry=self.registry,
        )
        # Post-market monitoring (drift, explanations, confirmed outcomes). All PHI-free: labels
        # are model, version, label, feature name; never a value.
        self.output_probability = Histogram(
            "medinfer_output_probability",
            "Model output probability per label, for drift watching.",
            ["model", "version", "label"],
            buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
            registry=self.registry,
        )
        self.records = Counter(
            "medinfer_records_total",
            "Records (feature vectors) inferred, the denominator of the imputation rate.",
            ["model", "version"],
            registry=self.registry,
        )
        self.features_imputed = Counter(
            "medinfer_features_imputed_total",
            "Features imputed because the record lacked them, by feature.",
            ["model", "version", "feature"],
            registry=self.registry,
        )
        self.feature_psi = Gauge(
            "medinfer_feature_psi",
            "Population stability index of each input feature over the service's sliding window against the "
            "training reference (0.1-0.25 moderate, > 0.25 major shift).",
            ["model", "version", "feature"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.explanations = Counter(
            "medinfer_explanations_total",
            "Explanations computed on request, by method (shapley, cam, occlusion).",
            ["model", "version", "method"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "medinfer_feedback_total",
            "Confirmed outcomes recorded for results, by verdict (agree, disagree, label).",
            ["model", "version", "verdict"],
            registry=self.registry,
        )
        self.confirmed_cases = Gauge(
            "medinfer_confirmed_cases",
            "Results with a confirmed outcome, by confirmed label. Database-wide: aggregate with max.",
            ["model", "version", "label"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.confirmed_sensitivity = Gauge(
            "medinfer_confirmed_sensitivity",
            "Sensitivity over confirmed cases at the operating point each result was decided at. "
            "Database-wide: aggregate with max.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.confirmed_specificity = Gauge(
            "medinfer_confirmed_specificity",
            "Specificity over confirmed cases. Database-wide: aggregate with max.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.calibration_error = Gauge(
            "medinfer_confirmed_calibration_error",
            "Expected calibration error (10 bins) of the positive label's probability over confirmed cases. "
            "Database-wide: aggregate with max.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.sensitivity_floor = Gauge(
            "medinfer_sensitivity_floor",
            "The operating point's claimed sensitivity minus the margin the model declares: the confirmed "
            "sensitivity should stay above it.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.decryption_failures = Counter(
            "medinfer_decryption_failures_total",
            "JWE payloads refused, by reason (malformed, alg, enc, zip, crit, cty, kid, decrypt, size).",
            ["reason"],
            registry=self.registry,
        )
        self.audit_checkpoints_refused = Counter(
            "medinfer_audit_checkpoint_refused_total",
            "Times the checkpointer refused to sign the audit head because it does not extend the last "
            "signed checkpoint: the chain was rolled back or rewritten in the database.",
            registry=self.registry,
        )
        self.dimse_rejections = Counter(
            "medinfer_dimse_rejections_total",
            "DIMSE connections and associations refused or aborted, by reason (calling-ae-not-allowed, "
            "called-ae-not-recognised, association-limit, peer-limit, connection-limit, pdu-too-large, "
            "association-timeout, pdu-timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "medinfer_auth_failures_total",
            "Rejected authentications by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.dicom_instances = Counter(
            "medinfer_dicom_instances_total",
            "DICOM instances received, by transport (rest, stow, dimse) and outcome (accepted or the error code).",
            ["transport", "outcome"],
            registry=self.registry,
        )
        self.studies = Counter(
            "medinfer_studies_total",
            "Studies inferred after they settled (asynchronous imaging path), by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.studies_waiting = Gauge(
            "medinfer_studies_waiting",
            "Studies received and waiting to settle or be inferred.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.outbox_events = Counter(
            "medinfer_pacs_outbox_events_total",
            "PACS outbox events: queued, delivered, retry, failed (gave up).",
            ["outcome"],
            registry=self.registry,
        )
        # Both counted in the database every replica shares: each replica reports the same
        # figure, so aggregate with max, never sum.
        self.outbox_backlog = Gauge(
            "medinfer_pacs_outbox_backlog",
            "DICOM SR results not delivered to the PACS, by state: pending (waiting or retrying), "
            "sending, held (no destination configured), failed (gave up). Database-wide: aggregate with max.",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.outbox_oldest_age = Gauge(
            "medinfer_pacs_outbox_oldest_age_seconds",
            "Age of the oldest SR result still waiting for the PACS (pending, sending or held); 0 when none "
            "waits. Database-wide: aggregate with max.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def watch_keys(self, source: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Export the rotation due date of each published encryption key."""
        collector = _KeyExpiryCollector(source)
        self.registry.register(collector)
        self._local.append(collector)

    def watch_gpus(self) -> bool:
        """Export GPU utilisation and memory through NVML when a GPU is present; absent otherwise."""
        collector = _GpuCollector.create()
        if collector is None:
            return False
        self.registry.register(collector)
        self._local.append(collector)
        return True

    def exposition(self) -> bytes:
        """What ``/metrics`` serves: this process's metrics, or every worker's merged."""
        if self._multiproc_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiproc_dir)  # type: ignore[no-untyped-call]
        for collector in self._local:
            merged.register(collector)
        return generate_latest(merged)

    def mark_process_dead(self) -> None:
        """Drop this worker's live gauges from the merged view (called at shutdown)."""
        if self._multiproc_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self._multiproc_dir)  # type: ignore[no-untyped-call]

    def registry_text(self) -> str:
        """The exposition text, as ``/metrics`` serves it."""
        return self.exposition().decode()

    def watch_models(self, source: Callable[[], Iterable[VersionStatus]]) -> None:
        """Export the registry's version states and providers at every scrape."""
        if self._model_collector is not None:
            self.registry.unregister(self._model_collector)
            self._local.remove(self._model_collector)
        self._model_collector = _ModelStatusCollector(source)
        self.registry.register(self._model_collector)
        self._local.append(self._model_collector)
