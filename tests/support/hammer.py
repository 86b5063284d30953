"""A load generator that runs in its own process, a few nice levels below the server.

Usage: ``python hammer.py PORT PATH HEADERS_JSON BODY_FILE THREADS``. It posts BODY_FILE to PATH
from THREADS keep-alive connections until its stdin closes, then prints how many answers were 200
and how many were anything else, and any transport errors by type, as JSON. Standard library only, so it starts fast.

In its own process, the load's threads do not hold the measuring process's GIL; niced, they do not
take a scarce CPU (CI has two) from the server's event loop, whose responsiveness is what is measured.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
from pathlib import Path


def main() -> None:
    port, path, headers_json, body_file, threads = sys.argv[1:6]
    os.nice(10)
    headers: dict[str, str] = json.loads(headers_json)
    body = Path(body_file).read_bytes()
    stop = threading.Event()
    counts = {"ok": 0, "other": 0}
    lock = threading.Lock()

    def hammer() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        try:
            while not stop.is_set():
                try:
                    connection.request("POST", path, body=body, headers=headers)
                    response = connection.getresponse()
                    response.read()
                    outcome = "ok" if response.status == 200 else "other"
                except (OSError, http.client.HTTPException) as exc:  # counted, never lost with the thread
                    outcome = f"error:{type(exc).__name__}"
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
                with lock:
                    counts[outcome] = counts.get(outcome, 0) + 1
        finally:
            connection.close()

    workers = [threading.Thread(target=hammer) for _ in range(int(threads))]
    for worker in workers:
        worker.start()
    print("started", flush=True)
    sys.stdin.read()
    stop.set()
    for worker in workers:
        worker.join()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
