"""Imaging benchmark: DICOM preprocessing against pydicom, and STOW-RS to SR-at-the-PACS latency
against a direct predict, measured in one run.

Run from the repository root::

    .venv/bin/python -m bench.dicom                       # 20 studies, settle 0.05 s, ~1 min on 2 cores
    .venv/bin/python -m bench.dicom --studies 40 --repeat 15 --settle 0.2

1. In process, on the real chest CR RG1 (1955 x 1841, from pydicom-data, never downloaded),
   uncompressed and JPEG 2000 lossless: medinfer's ``to_tensor`` with the ``cxr-pneumonia``
   recipe (decode and the whole pixel recipe) against pydicom's bare ``ds.pixel_array`` on the
   same files (``bench.dicom_decode.measure``); prints preprocess / bare decode (target <= 1.3x).
2. End to end on a live ``medinfer serve`` (loopback, SQLite, audit on): a receiving PACS runs in
   this process (the service's own C-STORE SCP, ``app.transport.dimse.scp.StoreScp``, AE
   ``BENCHPACS``, with a sink that timestamps each SR and reads the study it references), and
   the service is configured to deliver SR there (``MEDINFER_PACS_DESTINATION``). For each of
   ``--studies`` studies, sequentially, RG1 (UNCR and J2KR alternately) is relabelled with fresh
   Study/Series/SOP UIDs and sent by STOW-RS; the latency is from the request's start to the SR
   of that study arriving at the PACS. It is split into the STOW-RS response time, the
   configured settle time (``MEDINFER_STUDY_SETTLE_S``) and the rest (inference, SR, outbox,
   C-STORE). Interleaved with it, the same-run baseline: the same file (own fresh UIDs) sent to
   ``POST /v1/models/cxr-pneumonia/predict`` as ``application/dicom``, timed to its JSON answer
   (``direct``; ``direct prep`` is the server's own preprocessing time from that answer), and
   once more answered as the SR (``Accept: application/dicom``, ``direct SR``: inference and SR
   built synchronously, no spool, settle or outbox). One warm-up round per file is not counted.

The service retries a failed delivery from 0.2 s (``MEDINFER_PACS_RETRY_BASE_S``); the bench
PACS's C-STORE and association outcomes (and, for a rejected association, which associations
held its four slots) are printed with the service's warning and error log lines.

Prints two tables and the ratios; asserts nothing about time. The service is stopped with
SIGTERM and the temporary directory removed at the end, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom.association import Association

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also runnable as `python bench/dicom.py`
    sys.path.insert(0, str(ROOT))

from app.transport.dimse.scp import REJECTED, ScpConfig, StoreScp  # noqa: E402
from bench.dicom_decode import TARGET_RATIO, measure, recipe  # noqa: E402

MODEL = "cxr-pneumonia"
FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
PACS_AE = "BENCHPACS"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SR_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def testdata(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise SystemExit(f"{name} is not in the installed pydicom-data")
    return Path(path).read_bytes()


def relabelled(data: bytes) -> tuple[str, bytes]:
    """The same pixels and header under fresh Study/Series/SOP UIDs; (study UID, Part 10 bytes)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return str(ds.StudyInstanceUID), buffer.getvalue()


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) if samples else float("nan")


# -- 1. preprocessing in process -------------------------------------------------------------------


def preprocessing(repeat: int) -> list[dict[str, object]]:
    pixel_recipe = recipe()
    return [measure(name, repeat, pixel_recipe) for name in FILES]


# -- 2. the receiving PACS -------------------------------------------------------------------------


@dataclass
class PacsSink:
    """Timestamps each SR as the C-STORE hands it over, keyed by the study the SR references."""

    arrivals: dict[str, float] = field(default_factory=dict)
    others: int = 0
    events: Counter[str] = field(default_factory=Counter)
    #: At each rejected association: the open acceptor associations (calling AE, peer port, state).
    rejections: list[list[str]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def on_event(self, outcome: str, code: str) -> None:
        """StoreScp's hook: counts outcomes; on a rejected association, notes who holds the slots."""
        with self._cond:
            self.events[f"{outcome}:{code}" if code else outcome] += 1
            if outcome == REJECTED:
                self.rejections.append(
                    [
                        f"{t.requestor.ae_title.strip()}@{t.requestor.port}:"
                        f"{'established' if t.is_established else 'not-established'}"
                        for t in threading.enumerate()
                        if isinstance(t, Association) and t.is_acceptor
                    ]
                )

    def store(self, encoded: bytes, calling_ae: str) -> None:
        arrived = time.perf_counter()
        ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True)
        if not str(ds.SOPClassUID).startswith(SR_CLASS_PREFIX):
            with self._cond:
                self.others += 1
            return
        evidence = ds.get("CurrentRequestedProcedureEvidenceSequence")
        study = str(evidence[0].StudyInstanceUID if evidence else ds.StudyInstanceUID)
        with self._cond:
            self.arrivals.setdefault(study, arrived)
            self._cond.notify_all()

    def wait(self, study: str, timeout_s: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: study in self.arrivals, timeout=timeout_s)
            return self.arrivals.get(study)


@contextlib.contextmanager
def pacs() -> Iterator[tuple[int, PacsSink]]:
    sink = PacsSink()
    scp = StoreScp(
        ScpConfig(ae_title=PACS_AE, host="127.0.0.1", port=0, allowed_calling_aes=(), max_associations=4),
        sink,
        sink.on_event,
    )
    scp.start()
    try:
        yield scp.port, sink
    finally:
        scp.stop()


# -- 2. the service --------------------------------------------------------------------------------


@dataclass
class Service:
    base_url: str
    key: str
    log_path: Path

    def log_problems(self) -> list[str]:
        """WARNING and ERROR lines of the service's JSON log (and any non-JSON line)."""
        problems = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                level = str(json.loads(line).get("level", "")).upper()
            except (ValueError, AttributeError):
                level = "RAW"
            if level not in {"DEBUG", "INFO"}:
                problems.append(line)
        return problems


def _medinfer(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"medinfer {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result.stdout


@contextlib.contextmanager
def service(workdir: Path, pacs_port: int, settle_s: float) -> Iterator[Service]:
    """``medinfer migrate`` and ``serve`` on a free loopback port, SR to the bench PACS; SIGTERM at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDINFER_")} | {
        "MEDINFER_ENV": "test",
        "MEDINFER_DATA_DIR": str(workdir / "var"),
        "MEDINFER_MODEL_REPOSITORY": str(ROOT / "models"),
        "MEDINFER_HOST": "127.0.0.1",
        "MEDINFER_PORT": str(port),
        "MEDINFER_LOG_LEVEL": "WARNING",
        "MEDINFER_STUDY_SETTLE_S": str(settle_s),
        "MEDINFER_IMAGING_ROUTES": '[{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia"}]',
        "MEDINFER_PACS_DESTINATION": f"dimse://{PACS_AE}@127.0.0.1:{pacs_port}",
        "MEDINFER_PACS_RETRY_BASE_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    _medinfer(env, "migrate")
    key = json.loads(_medinfer(env, "clients", "register", "--client-id", "bench-imaging", "--scope", "infer"))[
        "api_key"
    ]
    log_path = workdir / "medinfer.log"
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"medinfer serve exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"medinfer serve not ready in 60 s:\n{log_path.read_text()[-4000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                        break
                time.sleep(0.1)
            yield Service(base_url, key, log_path)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


# -- 2. the measurement ----------------------------------------------------------------------------


@dataclass
class Sample:
    file: str
    e2e_s: float
    stow_s: float
    direct_s: float
    direct_preprocess_ms: float
    direct_inference_ms: float
    direct_sr_s: float


def _stow_body(encoded: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    body = b"".join(
        (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            encoded,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def one_study(client: httpx.Client, sink: PacsSink, source: bytes, name: str, service_: Service) -> Sample:
    """STOW-RS one relabelled copy and wait for its SR at the PACS; then predict the same file directly, as JSON
    (the baseline) and as the SR (``Accept: application/dicom``: the same SR built synchronously, no outbox)."""
    study, encoded = relabelled(source)
    body, content_type = _stow_body(encoded)
    _, direct_body = relabelled(source)

    started = time.perf_counter()
    response = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, "Accept": "application/dicom+json"}
    )
    stow_s = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:1000]}")
    arrived = sink.wait(study, SR_TIMEOUT_S)
    if arrived is None:
        problems = "\n".join(service_.log_problems()[-20:])
        raise RuntimeError(f"no SR for the study within {SR_TIMEOUT_S:.0f} s; service warnings/errors:\n{problems}")
    e2e_s = arrived - started
    time.sleep(0.05)  # let the outbox finish its bookkeeping before the baseline request

    started = time.perf_counter()
    response = client.post(
        f"/v1/models/{MODEL}/predict",
        content=direct_body,
        headers={"Content-Type": "application/dicom", "Accept": "application/json"},
    )
    direct_s = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"predict answered {response.status_code}: {response.text[:1000]}")
    timing = response.json().get("timing_ms", {})

    started = time.perf_counter()
    response = client.post(
        f"/v1/models/{MODEL}/predict",
        content=direct_body,
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom"},
    )
    direct_sr_s = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"predict (SR) answered {response.status_code}: {response.text[:1000]}")
    return Sample(
        name,
        e2e_s,
        stow_s,
        direct_s,
        float(timing.get("preprocess", "nan")),
        float(timing.get("inference", "nan")),
        direct_sr_s,
    )


def end_to_end(studies: int, settle_s: float) -> tuple[list[Sample], list[str], PacsSink]:
    """(samples, the service's warning/error log lines, what the PACS saw)."""
    sources = {name: testdata(name) for name in FILES}
    with (
        tempfile.TemporaryDirectory(prefix="medinfer-bench-dicom-") as tmp,
        pacs() as (pacs_port, sink),
        service(Path(tmp), pacs_port, settle_s) as served,
        httpx.Client(
            base_url=served.base_url, timeout=120, headers={"Authorization": f"Bearer {served.key}"}
        ) as client,
    ):
        for name in FILES:  # warm-up: imports, decoder plugins, first SCU association
            one_study(client, sink, sources[name], name, served)
        samples = []
        for i in range(studies):
            name = FILES[i % len(FILES)]
            samples.append(one_study(client, sink, sources[name], name, served))
        return samples, served.log_problems(), sink


# -- output ----------------------------------------------------------------------------------------


def print_preprocessing(rows: list[dict[str, object]], repeat: int) -> None:
    print(
        f"1. preprocessing in process (bench.dicom_decode), median of {repeat} runs, ms; decode = medinfer's decode "
        "alone; ratio = to_tensor / bare ds.pixel_array; max|diff| against the training reference"
    )
    header = (
        f"{'file':<14} {'transfer syntax':<44} {'image':<14} {'bare decode':>11} {'decode':>8} "
        f"{'to_tensor':>9} {'ratio':>6}  {'target':<14} max|diff|"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = float(r["ratio"])  # type: ignore[arg-type]
        diff = r["max_abs_diff"]
        print(
            f"{r['file']!s:<14} {r['syntax']!s:<44} {r['shape']!s:<14} {r['bare_ms']:>11.1f} {r['decode_ms']:>8.1f} "
            f"{r['to_tensor_ms']:>9.1f} {ratio:>5.2f}x  {'PASS' if ratio <= TARGET_RATIO else 'MISS'} "
            f"(<= {TARGET_RATIO}x)  {'n/a' if diff is None else f'{diff:.1e}'}"
        )
    print(
        "(uncompressed: the bare decode is a copy of the stored bytes into an array, so that ratio sets the whole "
        "recipe against a memory copy)"
    )


def print_end_to_end(samples: list[Sample], settle_s: float) -> None:
    print(
        f"\n2. STOW-RS -> SR at the PACS (DIMSE) vs direct predict, {len(samples)} sequential studies, "
        f"settle {settle_s * 1000:.0f} ms, ms (p50 / p95; direct prep: p50 of the server's timing_ms.preprocess)"
    )
    header = (
        f"{'file':<14} {'n':>3} {'e2e':>15} {'stow resp':>15} {'settle':>7} {'rest':>15} {'direct':>15} "
        f"{'direct prep':>11} {'direct SR':>15} {'e2e/direct':>10}"
    )
    print(header)
    print("-" * len(header))
    groups = [(name, [s for s in samples if s.file == name]) for name in FILES] + [("all", samples)]
    for name, group in groups:
        if not group:
            continue

        def cell(values: list[float]) -> str:
            return f"{percentile(values, 50):>7.1f}/{percentile(values, 95):<7.1f}"

        e2e = [s.e2e_s * 1000 for s in group]
        stow = [s.stow_s * 1000 for s in group]
        rest = [(s.e2e_s - s.stow_s - settle_s) * 1000 for s in group]
        direct = [s.direct_s * 1000 for s in group]
        direct_sr = [s.direct_sr_s * 1000 for s in group]
        prep = percentile([s.direct_preprocess_ms for s in group], 50)
        ratio = percentile(e2e, 50) / percentile(direct, 50)
        print(
            f"{name:<14} {len(group):>3} {cell(e2e)} {cell(stow)} {settle_s * 1000:>7.0f} {cell(rest)} "
            f"{cell(direct)} {prep:>11.1f} {cell(direct_sr)} {ratio:>9.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=9, help="repetitions per in-process measurement (median)")
    parser.add_argument("--studies", type=int, default=20, help="sequential STOW-RS studies (and direct predicts)")
    parser.add_argument("--settle", type=float, default=0.05, help="MEDINFER_STUDY_SETTLE_S for the service")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the service is stopped and the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    started = time.monotonic()
    rows = preprocessing(args.repeat)
    print_preprocessing(rows, args.repeat)
    samples, problems, sink = end_to_end(args.studies, args.settle)
    print_end_to_end(samples, args.settle)

    e2e = percentile([s.e2e_s for s in samples], 50)
    direct = percentile([s.direct_s for s in samples], 50)
    print()
    for r in rows:
        print(f"{r['file']}: preprocess / bare decode = {float(r['ratio']):.2f}x")  # type: ignore[arg-type]
    print(
        f"STOW-RS -> SR at PACS p50 / direct predict p50 = {e2e / direct:.2f}x "
        f"({e2e * 1000:.0f} / {direct * 1000:.0f} ms)"
    )
    print(
        "rest = e2e - STOW response - settle; the settle timer starts when the instance is spooled, a little "
        "before the STOW response is sent, so rest is if anything understated"
    )
    events = ", ".join(f"{k} {v}" for k, v in sorted(sink.events.items()))
    print(f"bench PACS: {events}; non-SR objects: {sink.others}")
    for holders in sink.rejections[:5]:
        print(f"  association rejected while open: {', '.join(holders) or 'none'}")
    print(f"service warning/error log lines: {len(problems)}")
    for line in problems[:10]:
        print(f"  {line[:300]}")
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
