"""Latency of small requests while extguard scans one large request body.

Starts the local stack on loopback: the mock upstream, `extguard serve` with the example policy,
and Envoy with `envoy/extguard-local.yaml`. Sends one chat request whose prompt is about 2.6 MB
of access-log lines, and small chat requests one after another until that one returns.
Prints the large request's status and time, and the count, median and maximum latency of the
small requests. Bodies of THREAD_SCAN_MIN_BYTES and more are scanned in a worker thread, which
is what keeps the small requests moving.

Run from the repository root: `.venv/bin/python benchmarks/large_body.py` (about 15 s).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from extguard.testing.stack import EXAMPLE_POLICY, Stack  # noqa: E402

LOG_LINES = 50_000
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def access_log(lines: int, seed: int = 7) -> str:
    """Return `lines` lines shaped like a web server's access log: client IP, path, status, size."""
    rng = random.Random(seed)
    return "\n".join(
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} - - "
        f"GET /api/v1/items/{rng.randint(100000, 999999)} 200 {rng.randint(1000, 99999)}"
        for _ in range(lines)
    )


def post_chat(base_url: str, content: str) -> tuple[int, float]:
    """Send one chat request; return its HTTP status and its time in seconds."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with _OPENER.open(request, timeout=60) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.perf_counter() - started


def main() -> int:
    prompt = access_log(LOG_LINES)
    with tempfile.TemporaryDirectory() as work_dir, Stack(policy=EXAMPLE_POLICY, work_dir=Path(work_dir)) as stack:
        post_chat(stack.base_url, "warm up")
        large: dict[str, tuple[int, float]] = {}
        sender = threading.Thread(target=lambda: large.setdefault("result", post_chat(stack.base_url, prompt)))
        sender.start()
        time.sleep(0.05)
        small = []
        while sender.is_alive():
            small.append(post_chat(stack.base_url, "a small request"))
        sender.join()

    status, seconds = large["result"]
    latencies = sorted(seconds * 1000 for _, seconds in small)
    statuses = sorted({status for status, _ in small})
    print(f"large request: {len(prompt.encode()) / 1e6:.1f} MB prompt, status {status}, {seconds:.2f} s")
    if latencies:
        print(
            f"small requests meanwhile: {len(latencies)}, statuses {statuses}, "
            f"median {statistics.median(latencies):.0f} ms, max {latencies[-1]:.0f} ms"
        )
    else:
        print("small requests meanwhile: none completed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
