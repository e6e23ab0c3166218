"""What the dashboard costs: the daemon's memory and CPU with [web] off and on (a benchmark, not a test).

Two runs of `anomalyd run` in a fresh process each, on the same `streams` real-time replays (noise, with
a threshold no window reaches, so that both runs do the same work): one without the web side, one with
it and a page open (a client following /api/live, as the dashboard does) and Prometheus scraping
/metrics every 5 s. After a warm-up, CPU is the process's user + system time over the measured span
(from /proc), RSS its resident memory at the end. Each run also times the daemon's start: from launch to
its READY=1 to systemd (a notification socket of our own), i.e. every bundle loaded and every stream open.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from anomalyd.bench_replays import replays

WARM_UP_S = 8.0
SCRAPE_INTERVAL_S = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cost:
    rss_mb: float
    cpu_percent: float  # of one core
    ready_s: float  # launch -> READY=1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(folder: Path, bundle: Path, streams: int, port: int | None) -> Path:
    head = 'log_level = "warning"\n[control]\nsocket = "control.sock"\n'
    head += f"[web]\nenabled = true\nport = {port}\n" if port is not None else ""
    text = replays(
        folder, bundle, streams, 30.0, realtime=True, loop=True, head=head, detector="threshold = 1e9"
    )
    path = folder / "bench.toml"
    path.write_text(text)
    return path


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _follow(url: str, stop: threading.Event) -> None:
    """A dashboard page's traffic: the live stream, read as it comes."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as resp:
        while not stop.is_set() and resp.readline():
            pass


def _scrape(url: str, stop: threading.Event) -> None:
    while not stop.wait(SCRAPE_INTERVAL_S):
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()


def _ready(notify: socket.socket, launched: float) -> float:
    """Seconds from `launched` until the daemon says READY=1."""
    while True:
        message = notify.recv(4096).decode()
        if "READY=1" in message.splitlines():
            return time.monotonic() - launched


def run_cost(bundle: Path, streams: int, seconds: float, web: bool) -> Cost:
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        folder = Path(tmp)
        port = _free_port() if web else None
        config = _config(folder, bundle, streams, port)
        notify.bind(str(folder / "notify.sock"))
        notify.settimeout(60.0)
        launched = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "anomalyd", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(folder / "notify.sock")},
        )  # fmt: skip
        stop = threading.Event()
        clients: list[threading.Thread] = []
        try:
            ready = _ready(notify, launched)
            time.sleep(WARM_UP_S)
            if port is not None:
                base = f"http://127.0.0.1:{port}"
                clients = [
                    threading.Thread(target=_follow, args=(base + "/api/live", stop), daemon=True),
                    threading.Thread(target=_scrape, args=(base + "/metrics", stop), daemon=True),
                ]
                for client in clients:
                    client.start()
                time.sleep(2.0)  # the page's first (whole-history) message is part of the warm-up
            cpu0, wall0 = _cpu_seconds(process.pid), time.monotonic()
            time.sleep(seconds)
            cpu1, wall1 = _cpu_seconds(process.pid), time.monotonic()
            rss = _rss_mb(process.pid)
        finally:
            stop.set()
            process.terminate()
            process.wait(15)
        return Cost(rss, 100.0 * (cpu1 - cpu0) / (wall1 - wall0), ready)


def web_cost(bundle: Path, streams: int = 16, seconds: float = 30.0) -> tuple[Cost, Cost]:
    """(without the dashboard, with it and a page open)."""
    return run_cost(bundle, streams, seconds, web=False), run_cost(bundle, streams, seconds, web=True)
