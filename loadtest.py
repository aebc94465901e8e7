"""`python loadtest.py`: simulated users chatting with the web app at once, through its public API.

Starts `python app.py --port PORT` (or uses `--url` of an app already running), then runs N users for a
while, each in its own thread with its own gradio_client: multi-turn chats on `/respond` (retrieval toggled
per turn) and, for a share of requests, `/compare`. It records every request's latency and outcome, the
app's queue length (Gradio's queue status route) and the app process's memory, and prints a JSON summary.
The benchmark reuses `run_load` and `AppServer` for its load figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from chatbot.runtime import PROJECT_ROOT
from chatbot.systems import SYSTEMS
from chatbot.web.page import QUEUE_SIZE

logger = logging.getLogger(__name__)

# Our own invented opening messages and follow-ups (no dataset text): every user picks from these.
OPENERS = [
    "I had such a hard day at work today. Things keep piling up.",
    "My dog died today. I am so distraught.",
    "I finally got the job offer I was hoping for!",
    "My best friend moved across the country and I really miss her.",
    "I heard strange noises downstairs last night and couldn't sleep.",
    "My exam results come out tomorrow and I can't stop worrying.",
    "We just found out we're having twins!",
    "Someone scratched my car in the parking lot and drove off.",
]
FOLLOW_UPS = [
    "Yes, exactly. It has been like this for weeks.",
    "I don't really know what to do about it.",
    "Thanks, that helps a bit. What would you do?",
    "My family doesn't really understand.",
    "I guess I just needed to tell someone.",
]
MAX_TURNS = 3  # user messages per conversation before a user starts a new one
READY_TIMEOUT_S = 600.0


def free_port() -> int:
    """A local port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Request:
    """One API call: what was asked, how long it took, and how it ended."""

    kind: str  # respond | compare
    use_retrieval: bool
    started: float  # seconds since the load began
    latency_s: float
    ok: bool
    error: str = ""


@dataclass
class Monitor:
    """Samples the app process's memory (RSS) and Gradio's queue length every `interval_s` in a thread."""

    url: str
    pid: int | None
    interval_s: float = 1.0
    samples: list[tuple[float, int, int | None]] = field(default_factory=list)  # (t, rss bytes, queue size)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Monitor:
        """Begin sampling."""
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the sampler."""
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        process = psutil.Process(self.pid) if self.pid else None
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(self.interval_s):
                rss = process.memory_info().rss if process and process.is_running() else 0
                try:
                    queue = http.get(f"{self.url.rstrip('/')}/gradio_api/queue/status").json().get("queue_size")
                except (httpx.HTTPError, ValueError):  # a busy server may miss one sample; the next one counts
                    queue = None
                self.samples.append((time.perf_counter() - self._started, rss, queue))

    def rss_at(self, t: float) -> int:
        """Largest RSS seen in the minute up to time `t` (seconds since start)."""
        window = [rss for at, rss, _ in self.samples if t - 60 <= at <= t and rss]
        return max(window) if window else 0


class AppServer:
    """`python app.py --port PORT` in a subprocess, for the duration of a `with` block."""

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None, log_path: Path | None = None):
        """Choose the port and environment; nothing starts before `__enter__`."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="empathetic-chat-app-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> AppServer:
        """Start the app and wait until it has answered one real `/respond` request."""
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "app.py", "--port", str(self.port)], cwd=PROJECT_ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_until_ready(self.url, self.process, self.log_path)
        except BaseException:
            self.__exit__()
            raise
        self.ready_s = round(time.perf_counter() - started, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the app (SIGTERM, then SIGKILL if it hangs)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_client(url: str) -> object:
    """A quiet gradio_client for the app at `url`."""
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll until the app answers a `/respond` request; fail early if the process dies."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"app.py exited with code {process.returncode} before serving:\n{tail}")
        try:
            make_client(url).predict("Hello.", [], False, api_name="/respond")
            return
        except Exception:  # not listening yet (connection refused, config not served yet): poll again
            time.sleep(0.1)  # fine polling: the start-up time is measured to a tenth of a second
    raise TimeoutError(f"app.py did not serve a request within {timeout_s:.0f} s (log: {log_path})")


def simulated_user(url: str, seed: int, deadline: float, compare_share: float, started: float,
                   record: Callable[[Request], None]) -> None:
    """One user: multi-turn chats until `deadline`, with retrieval toggled per turn and some Compare requests."""
    rng = random.Random(seed)
    client = None
    history: list[dict] = []
    while time.perf_counter() < deadline:
        if not history or len(history) >= 2 * MAX_TURNS:
            history, message = [], rng.choice(OPENERS)
        else:
            message = rng.choice(FOLLOW_UPS)
        use_retrieval = rng.random() < 0.5
        kind = "compare" if rng.random() < compare_share else "respond"
        begin = time.perf_counter()
        try:
            client = client or make_client(url)  # connecting is a request too: a refusal is an error, not a lost user
            if kind == "compare":
                left, right = rng.sample(list(SYSTEMS), 2)
                replies = client.predict(message, left, right, api_name="/compare")
                ok, error = all(isinstance(r, str) and r.strip() for r in replies), "empty reply"
            else:
                text, _emotion, _retrieved = client.predict(message, history, use_retrieval, api_name="/respond")
                ok, error = isinstance(text, str) and bool(text.strip()), "empty reply"
                if ok:
                    history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        except Exception as err:  # counted and reported: the load test's job is to find these
            ok, error = False, f"{type(err).__name__}: {err}"[:300]
        record(Request(kind, use_retrieval, round(begin - started, 3), time.perf_counter() - begin, ok,
                       "" if ok else error))


def latency_summary(latencies: list[float]) -> dict:
    """Count, p50, p95 and max of latencies, in seconds."""
    if not latencies:
        return {"n": 0}
    values = np.array(latencies)
    return {"n": len(latencies), "p50_s": round(float(np.percentile(values, 50)), 3),
            "p95_s": round(float(np.percentile(values, 95)), 3), "max_s": round(float(values.max()), 3)}


def run_load(url: str, users: int = 8, duration_s: float = 60.0, compare_share: float = 0.0,
             pid: int | None = None, seed: int = 0) -> dict:
    """Run `users` simulated users against the app at `url` for `duration_s`; returns the summary."""
    requests: list[Request] = []
    lock = threading.Lock()

    def record(request: Request) -> None:
        with lock:
            requests.append(request)

    monitor = Monitor(url, pid).start()
    started = time.perf_counter()
    deadline = started + duration_s
    threads = [threading.Thread(target=simulated_user, args=(url, seed + i, deadline, compare_share, started, record),
                                daemon=True) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started  # past the deadline: requests in flight at the deadline finish
    monitor.stop()
    return summarize(requests, monitor, users, duration_s, wall)


def summarize(requests: list[Request], monitor: Monitor, users: int, duration_s: float, wall: float) -> dict:
    """Throughput, latencies (overall and per kind/retrieval), errors, queue length and memory growth."""
    ok = [r for r in requests if r.ok]
    errors = [r for r in requests if not r.ok]
    groups = {
        "respond_retrieval_on": [r.latency_s for r in ok if r.kind == "respond" and r.use_retrieval],
        "respond_retrieval_off": [r.latency_s for r in ok if r.kind == "respond" and not r.use_retrieval],
        "compare": [r.latency_s for r in ok if r.kind == "compare"],
    }
    queue = [q for _, _, q in monitor.samples if q is not None]
    end = min(duration_s, wall)  # the drain after the last new request is not part of the test's minutes
    rss_first, rss_last = monitor.rss_at(min(60.0, end)), monitor.rss_at(end)
    minutes = [monitor.rss_at(t) for t in range(60, int(end) + 1, 60)]
    return {
        "users": users,
        "duration_s": duration_s,
        "wall_s": round(wall, 1),
        "requests": len(requests),
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted({r.error for r in errors})[:5],
        "throughput_per_min": round(60 * len(ok) / wall, 2) if wall else 0.0,
        "latency": latency_summary([r.latency_s for r in ok]),
        **{f"latency_{name}": latency_summary(values) for name, values in groups.items() if values},
        "queue_max": max(queue) if queue else None,
        "queue_median": statistics.median(queue) if queue else None,
        "rss_peak_mb": round(max((rss for _, rss, _ in monitor.samples), default=0) / 2**20, 1),
        "rss_first_minute_mb": round(rss_first / 2**20, 1),
        "rss_last_minute_mb": round(rss_last / 2**20, 1),
        "rss_growth": round(rss_last / rss_first - 1, 4) if rss_first else None,
        "rss_per_minute_mb": [round(rss / 2**20, 1) for rss in minutes],
    }


def verdict(summary: dict, queue_limit: int, max_rss_growth: float) -> list[str]:
    """The load test's pass conditions that failed (empty: all passed)."""
    failures = []
    if summary["errors"]:
        failures.append(f"{summary['errors']} request(s) failed or came back empty: {summary['error_examples']}")
    if summary["queue_max"] is not None and summary["queue_max"] > queue_limit:
        failures.append(f"queue reached {summary['queue_max']} (limit {queue_limit})")
    if summary["rss_growth"] is not None and summary["duration_s"] >= 120 and summary["rss_growth"] > max_rss_growth:
        failures.append(f"RSS grew {summary['rss_growth']:.1%} from the first to the last minute")
    return failures


def main(argv: list[str] | None = None) -> int:
    """Start the app (unless --url), run the load, print the summary; exit 1 when a pass condition fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="simulated users chatting at the same time")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (5 minutes by default)")
    parser.add_argument("--compare-share", type=float, default=0.2,
                        help="share of requests that go to /compare instead of /respond (0-1)")
    parser.add_argument("--url", default=None, help="load an app that is already running here instead of starting one")
    parser.add_argument("--port", type=int, default=None, help="port for the app this command starts (default: a free one)")
    parser.add_argument("--queue-limit", type=int, default=QUEUE_SIZE, help="largest acceptable queue length")
    parser.add_argument("--max-rss-growth", type=float, default=0.10,
                        help="largest acceptable RSS growth from minute 1 to the last minute (runs of 2+ minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated users' choices")
    parser.add_argument("--out", default=None, help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.url:
        summary = run_load(args.url, args.users, args.duration, args.compare_share, seed=args.seed)
    else:
        with AppServer(args.port) as app:
            logger.info("App ready after %.1f s at %s; %d users for %.0f s", app.ready_s, app.url, args.users,
                        args.duration)
            summary = run_load(app.url, args.users, args.duration, args.compare_share, app.process.pid, args.seed)
            summary["app_ready_s"] = app.ready_s
    failures = verdict(summary, args.queue_limit, args.max_rss_growth)
    summary["failures"] = failures
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    for line in failures:
        logger.error("FAIL: %s", line)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
