"""Cost of JWE-encrypted payloads against the plain path, measured in one run.

    .venv/bin/python bench/crypto.py [--repeat 20]

1. In process: opening (``app.security.jwe.open_payload``) a 1 MB and a 50 MB DICOM-sized
   payload, against just reading it, with the service's own key store.
2. End to end on a live ``medinfer serve`` (loopback): the same ~1 MB request (a batch of five
   224x224 images for cxr-pneumonia over the v2 binary extension) sent plain and as JWE, each
   timed over ``--repeat`` requests; prints the latency ratio (target: encrypted <= 1.15x plain).
   The imaging path (DICOM uploads) is not built yet, so the 1 MB request is a tensor upload of
   the same size; the 50 MB case is measured in process only.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit import server

from app.client import encrypt
from app.security.jwe import JOSE, open_payload
from app.security.keystore import KeyStore

MB = 1 << 20


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def in_process(repeat: int) -> list[tuple[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(Path(tmp), "bench-" + "k" * 40)
        store.generate("active")
        for size in (1 * MB, 50 * MB):
            payload = os.urandom(size)
            token = encrypt(payload, "application/dicom", store.jwks()).encode()
            sealed = []
            for _ in range(max(3, repeat // (5 if size > MB else 1))):
                started = time.perf_counter()
                opened = open_payload(token, JOSE, store, 128 * MB)
                sealed.append(time.perf_counter() - started)
                assert opened.plaintext == payload
            rows.append((f"open {size // MB} MB JWE (in process)", _median_ms(sealed)))
    return rows


def end_to_end(repeat: int) -> tuple[float, float, int]:
    images = np.random.default_rng(0).random((5, 1, 224, 224), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(images.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ]
        }
    ).encode()
    body = header + images.tobytes()
    with (
        tempfile.TemporaryDirectory(prefix="medinfer-bench-") as tmp,
        server(None, audited=True, workdir=Path(tmp)) as (port, _pid, key),
    ):
        base = f"http://127.0.0.1:{port}"
        jwks = httpx.get(f"{base}/.well-known/jwks.json").json()
        auth = {"Authorization": f"Bearer {key}", "Inference-Header-Content-Length": str(len(header))}
        plain_times, sealed_times = [], []
        with httpx.Client(base_url=base, timeout=120) as client:
            for i in range(repeat + 2):
                started = time.perf_counter()
                assert client.post("/v2/models/cxr-pneumonia/infer", content=body, headers=auth).status_code == 200
                plain = time.perf_counter() - started
                sealed_body = encrypt(body, "application/octet-stream", jwks).encode()
                started = time.perf_counter()
                response = client.post(
                    "/v2/models/cxr-pneumonia/infer", content=sealed_body, headers=auth | {"Content-Type": JOSE}
                )
                assert response.status_code == 200, response.text
                sealed = time.perf_counter() - started
                if i >= 2:  # the first rounds warm both paths
                    plain_times.append(plain)
                    sealed_times.append(sealed)
    return _median_ms(plain_times), _median_ms(sealed_times), len(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    for name, sealed in in_process(args.repeat):
        size_mb = 1 if " 1 MB" in name else 50
        print(f"{name:<34} {sealed:>10.2f} ms  ({size_mb / (sealed / 1000):.0f} MB/s)")
    print(f"\n{'end to end':<34} {'plain ms':>10} {'JWE ms':>10} {'ratio':>7}")
    plain, sealed, size = end_to_end(args.repeat)
    ratio = sealed / plain
    label = f"v2 infer, {size / MB:.2f} MB body (e2e)"
    print(f"{label:<34} {plain:>10.2f} {sealed:>10.2f} {ratio:>7.2f}")
    verdict = "PASS" if ratio <= 1.15 else "MISS"
    print(f"\nencrypted / plain request latency at ~1 MB: {ratio:.2f} (target <= 1.15: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
