"""The servers and the service of one campaign run: a private influxd and clickhouse-server,
the demo service under gunicorn with three ``aiohttp.GunicornWebWorker`` workers
(tests/_rel_campaign_app.py: both sinks, metrics in a shared ``multiprocess_dir``, a
``spool_dir`` when lunamon has that setting), and a private prometheus scraping it every
second. Everything is on 127.0.0.1; everything is stopped and removed by ``close()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Final

from servers import ClickHouseServer, InfluxServer, PrometheusServer, ServerError, free_port

from lunamon.settings import MonitoringSettings

__all__ = ["WORKERS", "Stack", "spool_supported"]

WORKERS: Final = 3
SINK_TIMEOUT: Final = 2.0
SHUTDOWN_TIMEOUT: Final = 15.0
_TESTS: Final = Path(__file__).resolve().parent.parent
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def spool_supported() -> bool:
    """Whether this lunamon has the crash spool (``spool_dir``, the issue after 18)."""
    return "spool_dir" in {f.name for f in dataclasses.fields(MonitoringSettings)}


def _worker_of(url: str) -> str:
    """The ``X-Worker`` pid of one answer on a fresh connection, ``""`` when none."""
    try:
        with _OPENER.open(url, timeout=1.0) as response:
            return str(response.headers.get("X-Worker", ""))
    except (OSError, urllib.error.URLError):
        return ""


class Stack:
    """One run's servers and service; ``start()`` brings all up, ``close()`` all down.

    ``spool=False`` runs the service without its crash spool even when lunamon has one
    (to see a killed worker's loss reported and attributed)."""

    def __init__(self, *, spool: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lunamon-campaign-"))
        self.influxd = InfluxServer(self.root / "influxd")
        self.clickhouse = ClickHouseServer(self.root / "clickhouse")
        for server in (self.influxd, self.clickhouse):
            server.root.mkdir()
        self.db = f"campaign_{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.metrics_dir = self.root / "metrics"
        self.stats_dir = self.root / "stats"
        self.stats_dir.mkdir()
        self.spool_dir = self.root / "spool" if spool and spool_supported() else None
        self.prometheus: PrometheusServer | None = None
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self.gunicorn_log = self.root / "gunicorn.log"
        self.gunicorn_exit: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- start

    def start(self) -> None:
        errors: list[BaseException] = []

        def start(server: InfluxServer | ClickHouseServer) -> None:
            try:
                server.start()
            except BaseException as exc:  # re-raised below, in this thread
                errors.append(exc)

        threads = [
            threading.Thread(target=start, args=(s,)) for s in (self.influxd, self.clickhouse)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        self._start_gunicorn()
        self.prometheus = PrometheusServer([f"127.0.0.1:{self.port}"], self.root / "prometheus")
        self.prometheus.root.mkdir()
        self.prometheus.start()

    def _start_gunicorn(self) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if k != "LUNAMON_FAULT_SEED"},  # not a setting
            "CAMPAIGN_INFLUX_PORT": str(self.influxd.port),
            "CAMPAIGN_DB": self.db,
            "CAMPAIGN_CLICKHOUSE_URL": self.clickhouse.url,
            "CAMPAIGN_METRICS_DIR": str(self.metrics_dir),
            "CAMPAIGN_STATS_DIR": str(self.stats_dir),
            "CAMPAIGN_SINK_TIMEOUT": str(SINK_TIMEOUT),
            "CAMPAIGN_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
            "CAMPAIGN_SPOOL_DIR": str(self.spool_dir or ""),
        }
        argv = [
            sys.executable, "-m", "gunicorn",
            "--chdir", str(_TESTS),
            "--bind", f"127.0.0.1:{self.port}",
            "--workers", str(WORKERS),
            "--worker-class", "aiohttp.GunicornWebWorker",
            "--graceful-timeout", str(int(SHUTDOWN_TIMEOUT + 10)),
            "--log-level", "warning",
            "_rel_campaign_app:create",
        ]  # fmt: skip
        with self.gunicorn_log.open("ab") as log:
            self.gunicorn = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_for_workers(timeout=40.0)

    def wait_for_workers(self, timeout: float = 20.0) -> None:
        """Until gunicorn has its ``WORKERS`` workers, each booted (its app answers)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.gunicorn is not None
            if self.gunicorn.poll() is not None:
                raise ServerError(f"gunicorn exited:\n{self.log_tail()}")
            pids = self.worker_pids()
            if len(pids) == WORKERS and all(self._booted(pid) for pid in pids):
                return
            if time.monotonic() > deadline:
                raise ServerError(f"gunicorn has workers {pids}, not {WORKERS}:\n{self.log_tail()}")
            time.sleep(0.05)

    def _booted(self, pid: int) -> bool:
        """Whether worker ``pid`` answered a request (fresh connections land anywhere, so
        this asks a few times)."""
        return any(_worker_of(f"{self.url}/healthcheck") == str(pid) for _ in range(30))

    def worker_pids(self) -> list[int]:
        """The pids of gunicorn's live workers (its child processes)."""
        assert self.gunicorn is not None
        master = self.gunicorn.pid
        try:
            text = Path(f"/proc/{master}/task/{master}/children").read_text()
        except OSError:
            return []
        pids = []
        for pid in (int(p) for p in text.split()):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                pids.append(pid)
        return sorted(pids)

    def metrics_counts(self, pid: int) -> tuple[int, int] | None:
        """What worker ``pid`` counted in its ``multiprocess_dir`` file (requests, errors);
        ``None`` without a readable file."""
        paths = [*self.metrics_dir.glob(f"*-{pid}.json"), *self.metrics_dir.glob(f"*-{pid}-*.json")]
        for path in paths:  # lunamon-metrics-<pid>[-<random>].json
            try:
                data = json.loads(path.read_text())
                return (
                    sum(int(row[-1]) for row in data["requests"]),
                    sum(int(row[-1]) for row in data["errors"]),
                )
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return None

    def final_stats(self) -> dict[int, dict[str, Any]]:
        """Each worker's ``stats()`` after its drain at the graceful stop, by pid (a killed
        worker left none)."""
        found = {}
        for path in self.stats_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                found[int(path.stem)] = json.loads(path.read_text())
        return found

    def lunamon_events(self) -> Counter[str]:
        """lunamon's warnings and errors in the service's log: ``"LEVEL event"`` -> count."""
        try:
            text = self.gunicorn_log.read_text(errors="replace")
        except OSError:
            return Counter()
        found: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("lunamon-log "):
                parts = line.split()
                found[" ".join(parts[1:3])] += 1
        return found

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.gunicorn_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------- stop

    def stop_service(self) -> int:
        """The graceful stop: SIGTERM to gunicorn, each worker drains; its exit status."""
        if self.gunicorn is None:
            return self.gunicorn_exit if self.gunicorn_exit is not None else -1
        for server in (self.influxd, self.clickhouse):
            server.resume()
        self.gunicorn.send_signal(signal.SIGTERM)
        try:
            self.gunicorn_exit = self.gunicorn.wait(SHUTDOWN_TIMEOUT + 20)
        except subprocess.TimeoutExpired:
            self.gunicorn.kill()
            self.gunicorn.wait()
            self.gunicorn_exit = -9
        self.gunicorn = None
        return self.gunicorn_exit

    def close(self) -> None:
        """Everything down (the service killed if it still runs), the directory removed."""
        try:
            if self.gunicorn is not None:
                workers = self.worker_pids()
                self.gunicorn.kill()
                self.gunicorn.wait()
                for pid in workers:  # the workers of the gunicorn this run started
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.gunicorn = None
        finally:
            for server in (self.prometheus, self.influxd, self.clickhouse):
                if server is not None:
                    server.resume()
                    server.close()
            shutil.rmtree(self.root, ignore_errors=True)
