"""Load benchmark of extguard: Envoy alone against Envoy with extguard, on loopback.

Two measurements, both against processes this script starts on 127.0.0.1 and stops again:

1. Throughput and latency. One Envoy (benchmarks/envoy-bench.yaml) returns a fixed response from
   a `direct_response` and has a `direct` listener (router only) and a `guarded` listener
   (extguard's ext_proc filter, then the router). wrk POSTs a chat-completions body with an
   e-mail address and a card number to each listener in turn for a fixed time.
2. Streaming delay of the hold-back. The openai client reads streamed completions from the
   Python mock upstream through a guarded and a passthrough `Stack`. The script reports when the
   first token, each e-mail address and the end of the stream arrive, and extguard's
   `extguard_stream_held_chars` histogram.

Usage, from the repository root:

    .venv/bin/python benchmarks/run.py            # print the Markdown summary
    .venv/bin/python benchmarks/run.py --write    # and replace the figures in RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # smoke run of about 30 s

With the defaults the whole run takes about 2.5 minutes. When wrk is missing, the script
installs it with apt-get (as root, or through `sudo -n`). When that fails, it falls back to a
Python load generator and notes that in the summary. The exit status is 1 when a check failed:
an error response, extguard not counting the requests, or text that was not masked as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import tempfile
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from extguard.testing.stack import EXAMPLE_POLICY, Stack, envoy_binary

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
BENCH_BOOTSTRAP = BENCH_DIR / "envoy-bench.yaml"
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
FIGURES_START = "<!-- figures:start (benchmarks/run.py --write replaces everything up to figures:end) -->"
FIGURES_END = "<!-- figures:end -->"

ENVOY_CONCURRENCY = 1  # one Envoy worker thread, so Envoy and extguard each get about one core
WRK_THREADS = 1
WRK_TIMEOUT_SECONDS = 5
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# CPU share of everything but Envoy, extguard and wrk above which the summary flags a load run.
OTHER_CPU_WARNING_PERCENT = 15
# Pause around each measured load run, so that requests of the warm-up before it are finished
# and the streams of its last requests are counted before the metrics are read.
SETTLE_SECONDS = 1.0

# Readiness probes and metrics reads go to loopback only, never through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# About 1 KB, like a request from a support tool for a ticket summary. The guarded listener
# masks the e-mail address and the card number. Nothing in it is a secret or an injection.
REQUEST_BODY = {
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "max_tokens": 300,
    "messages": [
        {
            "role": "system",
            "content": (
                "You are a support assistant for the billing team. Summarise customer tickets in "
                "three or four sentences, then suggest next steps. Keep a neutral tone and do not "
                "promise refunds that the refund policy does not allow."
            ),
        },
        {
            "role": "user",
            "content": (
                "Please summarise this ticket.\n\n"
                "From: Dana Whitfield <dana.whitfield@example.com>\n"
                "Subject: Charged twice for March\n\n"
                "Hello, I was billed twice for the March invoice on our annual plan. Both charges "
                "went to the card 4111 1111 1111 1111 on the same day, a few minutes apart. Our "
                "finance team noticed it during the monthly reconciliation. Could you refund the "
                "second charge and confirm when it will show on the statement? We would also like "
                "to know whether this can happen again with the April invoice, because we pay by "
                "card and our budget for this quarter is tight. Thanks, Dana"
            ),
        },
    ],
}

EMAIL_PATTERN = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")

# About 400 characters with three e-mail addresses, streamed 4 characters per SSE event.
STREAM_REPLY = (
    "Thanks for waiting. I checked the account and found two contacts on file: the billing "
    "contact is priya.raman@example.com and the technical contact is tom.becker@example.org. "
    "Both received the March invoice. If you want the refund for the duplicate charge sent "
    "somewhere else, reply from accounts-payable@example.net and we will update the record. "
    "The refund takes five to seven business days to appear on the statement."
)
MASKED_STREAM_REPLY = EMAIL_PATTERN.sub("<EMAIL_ADDRESS>", STREAM_REPLY)
STREAM_CHUNK_CHARS = 4
STREAM_CHUNK_DELAY_MS = 10
STREAM_WARMUP_REQUESTS = 2
CHARS_PER_TOKEN = 4  # rough average for English text


@dataclass(frozen=True)
class Settings:
    duration_seconds: int
    warmup_seconds: int
    connections: int
    rounds: int
    stream_requests: int


@dataclass
class Report:
    """Markdown lines of the summary and the checks that failed."""

    lines: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.failed_checks.append(message)
            progress(f"check failed: {message}")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- Machine and versions -----------------------------------------------------------------------


def command_output(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    return (result.stdout + result.stderr).strip()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def envoy_version() -> str:
    output = command_output([envoy_binary(), "--version"])
    match = re.search(r"version:\s*(\S+)", output)
    return match.group(1) if match else output


def machine_busy_percent(sample_seconds: float) -> float:
    """Return how busy the whole machine was over a short sample (100 % is one core)."""
    before = machine_busy_cpu_seconds()
    time.sleep(sample_seconds)
    return 100 * (machine_busy_cpu_seconds() - before) / sample_seconds


def describe_machine(load_generator: str) -> list[str]:
    return [
        "| setting | value |",
        "|---|---|",
        f"| CPU | {cpu_model()} |",
        f"| `nproc` | {command_output(['nproc'])} |",
        f"| Envoy | {envoy_version()} (`envoy --version`), `--concurrency {ENVOY_CONCURRENCY}` |",
        f"| Python | {platform.python_version()} |",
        f"| load generator | {load_generator} |",
        "| extguard | `extguard serve --config examples/policy.yaml` (default log level INFO) |",
        f"| machine busy before the run | {machine_busy_percent(2.0):.0f} % CPU over 2 s (100 % is one core) |",
    ]


# --- Processes and metrics ----------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of a process and all its threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat.rsplit(")", 1)[1].split()  # fields from the third on: state, ppid, ...
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND  # utime, stime


def machine_busy_cpu_seconds() -> float:
    """Return the CPU time all cores spent outside idle and I/O wait since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(value) for value in fields)
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS_PER_SECOND


def rusage_cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def read_metrics(url: str) -> MetricSamples:
    """Return every sample of a Prometheus text page, keyed by sample name and labels."""
    with _DIRECT.open(url, timeout=5) as response:
        text = response.read().decode("utf-8")
    samples: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample_total(samples: MetricSamples, name: str) -> float:
    """Return the sum of a sample over all its label values (0 when it was never recorded)."""
    return sum(value for (sample_name, _), value in samples.items() if sample_name == name)


def sample_delta(before: MetricSamples, after: MetricSamples, name: str) -> float:
    return sample_total(after, name) - sample_total(before, name)


# --- Load generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    error_responses: int  # statuses of 400 and above from wrk, non-2xx from the Python generator
    socket_errors: int  # connect, read and write errors and timeouts

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%(body)s]==]

-- Print the summary as one JSON line, so run.py does not parse wrk's human-readable report.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,'
    .. '"p50_us":%%.0f,"p99_us":%%.0f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def find_or_install_wrk() -> tuple[str | None, str]:
    """Return the wrk path (None when unavailable) and a note on how it was found or why not."""
    path = shutil.which("wrk")
    if path:
        return path, ""
    if shutil.which("apt-get") is None:
        return None, "wrk is not installed and apt-get is not available"
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        return None, "wrk is not installed, and installing it needs root or sudo"

    progress("wrk not found; installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (prefix + ["apt-get", "update", "-qq"], prefix + ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=300)
        except subprocess.TimeoutExpired:
            return None, f"`{shlex.join(command)}` timed out after 300 s"
        if result.returncode != 0:
            return None, f"`{shlex.join(command)}` failed with status {result.returncode}: {result.stderr.strip()[-300:]}"
    path = shutil.which("wrk")
    return (path, "installed with apt-get by this run") if path else (None, "apt-get installed wrk, but it is not on PATH")


def wrk_version(wrk: str) -> str:
    first_line = command_output([wrk, "-v"]).splitlines()[0]
    match = re.match(r"wrk\s+(\S+)", first_line)
    return match.group(1) if match else first_line


class WrkLoad:
    def __init__(self, wrk: str, work_dir: Path) -> None:
        self.wrk = wrk
        self.script = work_dir / "chat-completions.lua"
        self.script.write_text(WRK_SCRIPT % {"body": json.dumps(REQUEST_BODY)}, encoding="utf-8")

    def cpu_seconds(self) -> float:
        """Return the CPU time of the wrk runs so far (of all waited-for children)."""
        return rusage_cpu_seconds(resource.RUSAGE_CHILDREN)

    def run(self, url: str, duration_seconds: int, connections: int) -> LoadResult:
        command = [
            self.wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{duration_seconds}s",
            f"--timeout={WRK_TIMEOUT_SECONDS}s", "-s", str(self.script), url,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=duration_seconds + 60)
        match = re.search(r"^WRK_RESULT (\{.*\})$", result.stdout, re.MULTILINE)
        if result.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed with status {result.returncode}:\n{result.stdout}\n{result.stderr}")
        summary = json.loads(match.group(1))
        return LoadResult(
            requests=summary["requests"],
            seconds=summary["duration_us"] / 1e6,
            p50_ms=summary["p50_us"] / 1000,
            p99_ms=summary["p99_us"] / 1000,
            error_responses=summary["status_errors"],
            socket_errors=summary["socket_errors"],
        )


class PythonLoad:
    """Closed-loop load from asyncio and aiohttp, used only when wrk is unavailable.

    It runs in this process on the same 2 cores, so it is slower than wrk and takes CPU time
    from Envoy and extguard. Its figures are lower bounds.
    """

    def cpu_seconds(self) -> float:
        """Return the CPU time of this process, which is the generator while a run is going on."""
        return rusage_cpu_seconds(resource.RUSAGE_SELF)

    def run(self, url: str, duration_seconds: int, connections: int) -> LoadResult:
        return asyncio.run(self._run(url, duration_seconds, connections))

    async def _run(self, url: str, duration_seconds: int, connections: int) -> LoadResult:
        import aiohttp

        body = json.dumps(REQUEST_BODY).encode("utf-8")
        latencies: list[float] = []
        counts = {"error_responses": 0, "socket_errors": 0}
        started = time.perf_counter()
        deadline = started + duration_seconds
        timeout = aiohttp.ClientTimeout(total=WRK_TIMEOUT_SECONDS)
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:

            async def send_until_deadline() -> None:
                while time.perf_counter() < deadline:
                    sent = time.perf_counter()
                    try:
                        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                            await response.read()
                            if not 200 <= response.status < 300:
                                counts["error_responses"] += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        counts["socket_errors"] += 1
                        continue
                    latencies.append(time.perf_counter() - sent)

            await asyncio.gather(*(send_until_deadline() for _ in range(connections)))
        elapsed = time.perf_counter() - started
        return LoadResult(
            requests=len(latencies),
            seconds=elapsed,
            p50_ms=percentile(latencies, 50) * 1000,
            p99_ms=percentile(latencies, 99) * 1000,
            **counts,
        )


def percentile(values: list[float], rank: int) -> float:
    """Return the rank-th percentile, interpolated between the nearest samples."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[rank - 1]


# --- Benchmark 1: throughput and latency --------------------------------------------------------


@dataclass(frozen=True)
class LoadRun:
    number: int
    listener: str
    result: LoadResult
    extguard_streams: float  # growth of extguard_extproc_streams_total during the run
    guard_hits: float  # growth of extguard_guard_hits_total during the run
    cpu_percent: dict[str, float]  # CPU time over wall time, per process


def post_once(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(REQUEST_BODY).encode("utf-8"), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with _DIRECT.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass(frozen=True)
class ThroughputResult:
    runs: list[LoadRun]
    response_bytes: int  # size of the fixed chat.completion body


def measure_throughput(settings: Settings, load: WrkLoad | PythonLoad, report: Report) -> ThroughputResult:
    bench_stack = Stack(
        policy=EXAMPLE_POLICY,
        bootstrap=BENCH_BOOTSTRAP,
        mock_upstream=False,
        extra_ports=("DIRECT_PORT", "GUARDED_PORT"),
        envoy_concurrency=ENVOY_CONCURRENCY,
    )
    with bench_stack as stack:
        envoy, extguard = stack.process("envoy"), stack.process("extguard")
        metrics_url = stack.metrics_url
        ports = stack.ports

        urls = {
            "direct": f"http://127.0.0.1:{ports['DIRECT_PORT']}/v1/chat/completions",
            "guarded": f"http://127.0.0.1:{ports['GUARDED_PORT']}/v1/chat/completions",
        }
        response_bytes = 0
        for listener, url in urls.items():
            status, body = post_once(url)
            report.check(status == 200 and b'"object":"chat.completion"' in body,
                         f"a single POST to the {listener} listener returned {status}: {body[:500]!r}")
            response_bytes = len(body)

        runs: list[LoadRun] = []
        for _ in range(settings.rounds):
            for listener, url in urls.items():
                number = len(runs) + 1
                progress(f"run {number}: {listener}, {settings.warmup_seconds} s warm-up, {settings.duration_seconds} s measured")
                load.run(url, settings.warmup_seconds, settings.connections)
                time.sleep(SETTLE_SECONDS)

                metrics_before = read_metrics(metrics_url)
                cpu_before = {"Envoy": process_cpu_seconds(envoy.pid), "extguard": process_cpu_seconds(extguard.pid),
                              "load generator": load.cpu_seconds(), "machine": machine_busy_cpu_seconds()}
                wall_start = time.perf_counter()
                result = load.run(url, settings.duration_seconds, settings.connections)
                wall = time.perf_counter() - wall_start
                cpu_after = {"Envoy": process_cpu_seconds(envoy.pid), "extguard": process_cpu_seconds(extguard.pid),
                             "load generator": load.cpu_seconds(), "machine": machine_busy_cpu_seconds()}
                cpu_percent = {name: 100 * (cpu_after[name] - cpu_before[name]) / wall for name in cpu_before}
                # Other sessions on the machine compete for the same cores, and their share shows here.
                # The per-process and machine-wide samples are taken a moment apart, so a small
                # negative remainder means an idle machine.
                cpu_percent["other"] = max(0.0, cpu_percent.pop("machine") - sum(cpu_percent.values()))
                time.sleep(SETTLE_SECONDS)
                metrics_after = read_metrics(metrics_url)

                run = LoadRun(
                    number=number,
                    listener=listener,
                    result=result,
                    extguard_streams=sample_delta(metrics_before, metrics_after, "extguard_extproc_streams_total"),
                    guard_hits=sample_delta(metrics_before, metrics_after, "extguard_guard_hits_total"),
                    cpu_percent=cpu_percent,
                )
                runs.append(run)
                check_load_run(run, settings, report)
        return ThroughputResult(runs, response_bytes)


def check_load_run(run: LoadRun, settings: Settings, report: Report) -> None:
    result = run.result
    report.check(result.requests > 0, f"run {run.number} ({run.listener}) completed no request")
    report.check(result.error_responses == 0, f"run {run.number} ({run.listener}): {result.error_responses} error responses")
    report.check(result.socket_errors == 0, f"run {run.number} ({run.listener}): {result.socket_errors} socket errors or timeouts")
    if run.listener == "direct":
        report.check(run.extguard_streams == 0, f"run {run.number} (direct) opened {run.extguard_streams:.0f} extguard streams")
    else:
        # Requests still in flight when the load generator stops have opened a stream but are not
        # counted as completed, so extguard counts up to one stream per connection more.
        report.check(
            result.requests <= run.extguard_streams <= result.requests + settings.connections,
            f"run {run.number} (guarded): extguard saw {run.extguard_streams:.0f} streams for {result.requests} requests",
        )


def describe_throughput(throughput: ThroughputResult, settings: Settings, report: Report) -> None:
    runs = throughput.runs
    body_bytes = len(json.dumps(REQUEST_BODY).encode("utf-8"))
    report.add(
        "### Throughput and latency: Envoy alone against Envoy with extguard",
        "",
        f"{settings.connections} connections, {settings.duration_seconds} s per run after a "
        f"{settings.warmup_seconds} s warm-up, runs alternating `direct` and `guarded` on one Envoy "
        f"(`benchmarks/envoy-bench.yaml`). Each request is a {body_bytes}-byte POST to "
        "`/v1/chat/completions` with one e-mail address and one card number. The answer is a fixed "
        f"{throughput.response_bytes}-byte `chat.completion` from Envoy's `direct_response`. CPU is CPU time over wall time "
        "during the run (100 % is one core, 200 % the machine). Other CPU is the busy time of the "
        "whole machine (from /proc/stat) minus Envoy, extguard and the load generator. It covers "
        "this script, the kernel and any other program that ran at the same time.",
        "",
        "| run | listener | requests | requests/s | p50 ms | p99 ms | error responses | socket errors "
        "| extguard streams | values masked | Envoy CPU | extguard CPU | load generator CPU | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    )
    for run in runs:
        result = run.result
        cpu = run.cpu_percent
        report.add(
            f"| {run.number} | {run.listener} | {result.requests} | {result.requests_per_second:.0f} "
            f"| {result.p50_ms:.2f} | {result.p99_ms:.2f} | {result.error_responses} | {result.socket_errors} "
            f"| {run.extguard_streams:.0f} | {run.guard_hits:.0f} "
            f"| {cpu['Envoy']:.0f} % | {cpu['extguard']:.0f} % | {cpu['load generator']:.0f} % | {cpu['other']:.0f} % |"
        )

    report.add(
        "",
        "Ratios guarded/direct, per round (a round is one direct run and the guarded run after it):",
        "",
        "| round | requests/s | p50 latency | p99 latency |",
        "|---|---|---|---|",
    )
    for direct, guarded in zip(runs[0::2], runs[1::2], strict=True):
        d, g = direct.result, guarded.result
        report.add(
            f"| {direct.number}+{guarded.number} | {g.requests_per_second / d.requests_per_second:.3f} "
            f"| {g.p50_ms / d.p50_ms:.1f}× | {g.p99_ms / d.p99_ms:.1f}× |"
        )

    direct_runs = [run for run in runs if run.listener == "direct"]
    guarded_runs = [run for run in runs if run.listener == "guarded"]
    direct_rate = statistics.mean(run.result.requests_per_second for run in direct_runs)
    guarded_rate = statistics.mean(run.result.requests_per_second for run in guarded_runs)
    report.add(
        "",
        f"Mean over the runs: {direct_rate:.0f} requests/s direct and {guarded_rate:.0f} guarded "
        f"({100 * guarded_rate / direct_rate:.0f} %). The inverse of the rate is "
        f"{1000 / direct_rate:.3f} ms per request direct and {1000 / guarded_rate:.3f} ms guarded. "
        f"Median latency was "
        f"{statistics.mean(run.result.p50_ms for run in direct_runs):.2f} ms direct and "
        f"{statistics.mean(run.result.p50_ms for run in guarded_runs):.2f} ms guarded. "
        f"extguard used {statistics.mean(run.cpu_percent['extguard'] for run in guarded_runs):.0f} % "
        "CPU during the guarded runs.",
        "",
    )
    busy_runs = [run for run in runs if run.cpu_percent["other"] > OTHER_CPU_WARNING_PERCENT]
    if busy_runs:
        listed = ", ".join(f"{run.number} ({run.cpu_percent['other']:.0f} %)" for run in busy_runs)
        report.add(
            f"**Warning:** other work used more than {OTHER_CPU_WARNING_PERCENT} % CPU during runs "
            f"{listed}, so those figures are lower than on an idle machine.",
            "",
        )


# --- Benchmark 2: streaming delay of the hold-back ----------------------------------------------


@dataclass(frozen=True)
class StreamTiming:
    """Arrival of one streamed reply, in seconds since the request was sent."""

    arrivals: list[tuple[float, int]]  # per content piece: seconds, characters received so far
    total_seconds: float
    text: str

    @property
    def first_token_seconds(self) -> float:
        return self.arrivals[0][0] if self.arrivals else self.total_seconds

    def seconds_until_character(self, offset: int) -> float:
        """Return when the character at `offset` of the received text arrived."""
        for seconds, received in self.arrivals:
            if received > offset:
                return seconds
        return self.total_seconds


# Start offsets of the e-mail addresses in the text each path delivers. The guarded path delivers
# the placeholder in their place, so the difference between the paths is how long extguard held it.
ADDRESS_OFFSETS = {
    "direct": [match.start() for match in EMAIL_PATTERN.finditer(STREAM_REPLY)],
    "guarded": [match.start() for match in re.finditer("<EMAIL_ADDRESS>", MASKED_STREAM_REPLY)],
}

# Text between two addresses, far from both, that contains nothing to mask.
PLAIN_TEXT_MARKER = "March invoice"
PLAIN_TEXT_OFFSETS = {"direct": STREAM_REPLY.index(PLAIN_TEXT_MARKER), "guarded": MASKED_STREAM_REPLY.index(PLAIN_TEXT_MARKER)}


def openai_client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.base_url}/v1",
        api_key="bench-key",
        max_retries=0,
        timeout=20,
        http_client=openai.DefaultHttpxClient(trust_env=False),  # loopback, never through a proxy
    )


def time_one_stream(client: openai.OpenAI) -> StreamTiming:
    mock_script = {"reply": STREAM_REPLY, "chunk_chars": STREAM_CHUNK_CHARS, "chunk_delay_ms": STREAM_CHUNK_DELAY_MS}
    started = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    pieces: list[str] = []
    received = 0
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Who receives the invoices on this account?"}],
        stream=True,
        extra_body={"mock": mock_script},
    )
    for chunk in stream:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            received += len(content)
            arrivals.append((time.perf_counter() - started, received))
            pieces.append(content)
    return StreamTiming(arrivals, time.perf_counter() - started, "".join(pieces))


def held_chars_buckets(samples: MetricSamples) -> dict[float, float]:
    """Return the cumulative bucket counts of extguard_stream_held_chars, keyed by upper bound."""
    buckets: dict[float, float] = {}
    for (name, labels), value in samples.items():
        if name == "extguard_stream_held_chars_bucket":
            buckets[float(dict(labels)["le"])] = value
    return dict(sorted(buckets.items()))


def read_metrics_after_streams(metrics_url: str, before: MetricSamples, streams: int) -> MetricSamples:
    """Read the metrics once the hold-back of every stream is recorded, or after 5 s.

    extguard records a stream's hold-back when its ext_proc stream ends, which can be a moment
    after the client has read the last event.
    """
    deadline = time.monotonic() + 5
    while True:
        after = read_metrics(metrics_url)
        recorded = sample_delta(before, after, "extguard_stream_held_chars_count")
        if recorded >= streams or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


@dataclass(frozen=True)
class StreamingResult:
    timings: dict[str, list[StreamTiming]]
    held_count: float
    held_sum: float
    held_buckets: dict[float, float]  # cumulative counts of the measured streams by upper bound


def measure_streaming(settings: Settings, report: Report) -> StreamingResult:
    expected_text = {"direct": STREAM_REPLY, "guarded": MASKED_STREAM_REPLY}
    with Stack(policy=EXAMPLE_POLICY, guarded=True) as guarded, Stack(guarded=False) as direct:
        clients = {"direct": openai_client(direct), "guarded": openai_client(guarded)}
        for client in clients.values():
            for _ in range(STREAM_WARMUP_REQUESTS):
                time_one_stream(client)

        before = read_metrics(guarded.metrics_url)
        progress(f"streaming: {settings.stream_requests} streamed completions each through direct and guarded")
        timings: dict[str, list[StreamTiming]] = {"direct": [], "guarded": []}
        for index in range(settings.stream_requests):
            # Alternate which path goes first, so a slow moment of the machine hits both alike.
            order = ("direct", "guarded") if index % 2 == 0 else ("guarded", "direct")
            for name in order:
                timing = time_one_stream(clients[name])
                report.check(timing.text == expected_text[name], f"{name} stream {index} returned {timing.text!r}")
                timings[name].append(timing)
        after = read_metrics_after_streams(guarded.metrics_url, before, settings.stream_requests)

    buckets_before, buckets_after = held_chars_buckets(before), held_chars_buckets(after)
    return StreamingResult(
        timings=timings,
        held_count=sample_delta(before, after, "extguard_stream_held_chars_count"),
        held_sum=sample_delta(before, after, "extguard_stream_held_chars_sum"),
        held_buckets={bound: count - buckets_before.get(bound, 0.0) for bound, count in buckets_after.items()},
    )


def streaming_measures(result: StreamingResult) -> list[tuple[str, dict[str, list[float]]]]:
    """Return each reported measure with its seconds per path, in table order."""
    measures = [("time to first content token", {
        name: [timing.first_token_seconds for timing in timings] for name, timings in result.timings.items()
    })]  # fmt: skip
    measures.append((f"plain text ({PLAIN_TEXT_MARKER!r}) reaches the client", {
        name: [timing.seconds_until_character(PLAIN_TEXT_OFFSETS[name]) for timing in timings]
        for name, timings in result.timings.items()
    }))  # fmt: skip
    for number in range(len(ADDRESS_OFFSETS["direct"])):
        seconds = {
            name: [timing.seconds_until_character(ADDRESS_OFFSETS[name][number]) for timing in timings]
            for name, timings in result.timings.items()
        }
        measures.append((f"e-mail address {number + 1} reaches the client", seconds))
    measures.append(("total time", {
        name: [timing.total_seconds for timing in timings] for name, timings in result.timings.items()
    }))  # fmt: skip
    return measures


def describe_streaming(result: StreamingResult, settings: Settings, report: Report) -> None:
    masked_streams = sum(timing.text == MASKED_STREAM_REPLY for timing in result.timings["guarded"])
    report.add(
        "### Streaming delay of the hold-back",
        "",
        f"{settings.stream_requests} streamed chat completions through each path, one at a time, "
        "with the `openai` client against the Python mock upstream (`Stack`, one Envoy per path). "
        f"Each reply is {len(STREAM_REPLY)} characters with {len(ADDRESS_OFFSETS['direct'])} "
        f"e-mail addresses, sent {STREAM_CHUNK_CHARS} characters per SSE event every "
        f"{STREAM_CHUNK_DELAY_MS} ms, so a stream lasts at least "
        f"{len(STREAM_REPLY) // STREAM_CHUNK_CHARS * STREAM_CHUNK_DELAY_MS} ms. "
        f"{masked_streams} of {len(result.timings['guarded'])} guarded streams arrived with every "
        "address masked. An address reaches the client when its first character arrives (direct) "
        "or its `<EMAIL_ADDRESS>` placeholder arrives (guarded). Times are from sending the request.",
        "",
        "| measure | direct median | guarded median | guarded − direct, medians | direct p99 | guarded p99 |",
        "|---|---|---|---|---|---|",
    )
    address_delays_ms: list[float] = []
    for label, seconds in streaming_measures(result):
        direct_median = 1000 * statistics.median(seconds["direct"])
        guarded_median = 1000 * statistics.median(seconds["guarded"])
        if label.startswith("e-mail address"):
            address_delays_ms.append(guarded_median - direct_median)
        report.add(
            f"| {label} | {direct_median:.1f} ms | {guarded_median:.1f} ms | {guarded_median - direct_median:+.1f} ms "
            f"| {1000 * percentile(seconds['direct'], 99):.1f} ms | {1000 * percentile(seconds['guarded'], 99):.1f} ms |"
        )
    if settings.stream_requests < 100:
        report.add("", f"With {settings.stream_requests} samples per path, p99 lies between the two slowest.")

    describe_held_chars(result, report)

    mean_held = result.held_sum / result.held_count if result.held_count else float("nan")
    tokens = mean_held / CHARS_PER_TOKEN
    pace_ms = mean_held / STREAM_CHUNK_CHARS * STREAM_CHUNK_DELAY_MS
    report.add(
        "",
        "What the delay means: extguard holds back text that may be the start of a value to mask, "
        "and releases it (masked or unchanged) once later text settles the question. The held "
        "characters reach the client that much later in the stream: a hold-back of "
        f"{mean_held:.0f} characters is about {tokens:.0f} tokens of upstream output, at about "
        f"{CHARS_PER_TOKEN} characters per token. At this mock's pace of {STREAM_CHUNK_CHARS} "
        f"characters every {STREAM_CHUNK_DELAY_MS} ms that is an estimated {pace_ms:.0f} ms, and the "
        f"addresses above arrived {statistics.mean(address_delays_ms):.0f} ms later on average "
        "(mean of the differences of medians). Plain text between the addresses arrives with "
        "the delay shown in its own row. For a model streaming an assumed 50 tokens per second, "
        f"{tokens:.0f} tokens would be about {tokens * 20:.0f} ms.",
        "",
    )


def describe_held_chars(result: StreamingResult, report: Report) -> None:
    mean_held = result.held_sum / result.held_count if result.held_count else float("nan")
    report.add(
        "",
        f"Hold-back from `extguard_stream_held_chars` over the measured guarded streams: "
        f"{result.held_count:.0f} observations, one per streamed text channel. The mean of the "
        f"largest hold-back per channel is {mean_held:.1f} characters.",
        "",
        "| largest characters held back | channels |",
        "|---|---|",
    )
    lower: float | None = None
    for bound, cumulative in result.held_buckets.items():
        count = cumulative - (result.held_buckets[lower] if lower is not None else 0.0)
        if bound == float("inf"):
            label = f"more than {lower:.0f}"
        elif lower is None:
            label = f"{bound:.0f}"
        else:
            label = f"{lower + 1:.0f} to {bound:.0f}"
        report.add(f"| {label} | {count:.0f} |")
        lower = bound


# --- Summary and RESULTS.md ---------------------------------------------------------------------


def run_command_text() -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO_ROOT)
    script = Path(__file__).resolve().relative_to(REPO_ROOT)
    return shlex.join([str(python), str(script), *sys.argv[1:]])


def write_results(figures: str) -> None:
    """Replace the text between the figures markers of RESULTS.md, or create the file."""
    section = f"{FIGURES_START}\n{figures.rstrip()}\n{FIGURES_END}"
    if RESULTS_PATH.exists():
        text = RESULTS_PATH.read_text(encoding="utf-8")
        start, end = text.find(FIGURES_START), text.find(FIGURES_END)
        if start < 0 or end < start:
            raise SystemExit(f"error: {RESULTS_PATH} has no figures markers; add the lines\n{FIGURES_START}\n{FIGURES_END}")
        text = text[:start] + section + text[end + len(FIGURES_END):]
    else:
        text = f"# extguard benchmark results\n\n{section}\n"
    RESULTS_PATH.write_text(text, encoding="utf-8")


def parse_arguments() -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-seconds", type=int, default=15, help="measured seconds per load run (default %(default)s)")
    parser.add_argument("--warmup-seconds", type=int, default=3, help="warm-up seconds before each load run (default %(default)s)")
    parser.add_argument("--connections", type=int, default=16, help="open connections during load runs (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of direct and guarded load runs (default %(default)s)")
    parser.add_argument("--stream-requests", type=int, default=30,
                        help="streamed completions measured per path (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s load runs, 1 s warm-up, 1 round, 5 streams per path")
    parser.add_argument("--write", action="store_true", help=f"replace the figures section of {RESULTS_PATH.relative_to(REPO_ROOT)}")
    args = parser.parse_args()

    if args.quick and args.write:
        parser.error("--quick figures are a smoke run and are not written to RESULTS.md; drop --quick or --write")
    for name in ("duration_seconds", "connections", "rounds", "stream_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_seconds < 1:
        parser.error(f"--warmup-seconds must be at least 1, got {args.warmup_seconds}")
    if args.quick:
        settings = Settings(duration_seconds=3, warmup_seconds=1, connections=args.connections, rounds=1, stream_requests=5)
    else:
        settings = Settings(args.duration_seconds, args.warmup_seconds, args.connections, args.rounds, args.stream_requests)
    return args, settings


def main() -> int:
    args, settings = parse_arguments()
    started = time.monotonic()
    report = Report()

    wrk, wrk_note = find_or_install_wrk()
    with tempfile.TemporaryDirectory(prefix="extguard-bench-wrk-") as wrk_dir:
        if wrk:
            load: WrkLoad | PythonLoad = WrkLoad(wrk, Path(wrk_dir))
            load_generator = f"wrk {wrk_version(wrk)}, {WRK_THREADS} thread, on the same machine"
            if wrk_note:
                load_generator += f" ({wrk_note})"
        else:
            load = PythonLoad()
            load_generator = f"Python asyncio and aiohttp fallback, because {wrk_note}; its figures are lower bounds"
            progress(f"falling back to the Python load generator: {wrk_note}")

        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        report.add("## Figures", "", f"Measured on {date} with `{run_command_text()}`.", "")
        report.add(*describe_machine(load_generator), "")

        throughput = measure_throughput(settings, load, report)
    describe_throughput(throughput, settings, report)
    streaming = measure_streaming(settings, report)
    describe_streaming(streaming, settings, report)

    elapsed = time.monotonic() - started
    report.add(f"The whole run took {elapsed:.0f} s.")
    if report.failed_checks:
        report.add("", "**Failed checks:**", "", *(f"- {message}" for message in report.failed_checks))
    figures = "\n".join(report.lines) + "\n"
    print(figures)

    if args.write:
        if report.failed_checks:
            progress(f"{RESULTS_PATH} was not written, because {len(report.failed_checks)} checks failed")
        else:
            write_results(figures)
            progress(f"wrote the figures to {RESULTS_PATH}")
    return 1 if report.failed_checks else 0


if __name__ == "__main__":
    raise SystemExit(main())
