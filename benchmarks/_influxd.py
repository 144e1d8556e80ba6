"""A private influxd for the benchmarks: free 127.0.0.1 ports, a temporary data directory.

Started as SERVERS.md describes (``influxd -config FILE``, ``/ping`` polled until
it answers 204), stopped with SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from benchmarks._common import free_port

__all__ = ["Influxd", "influxd_available"]

STARTUP_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0

_CONFIG: Final = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
[monitor]
  store-enabled = false
[logging]
  level = "warn"
[continuous_queries]
  enabled = false
"""


def influxd_available() -> bool:
    return shutil.which("influxd") is not None


class Influxd:
    """``with Influxd() as server:`` a running influxd at ``server.url``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lunamon-bench-influxd-"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _request(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30.0) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as err:
            with err:
                return int(err.code), bytes(err.read())

    def start(self) -> None:
        config = self.root / "influxd.conf"
        config.write_text(_CONFIG.format(root=self.root, port=self.port, rpc_port=free_port()))
        log_path = self.root / "influxd.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["influxd", "-config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited: {log_path.read_text(errors='replace')}")
            try:
                if self._request("GET", "/ping")[0] == 204:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"influxd not ready after {STARTUP_TIMEOUT} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, q: str, db: str | None = None) -> Any:
        params = {"q": q} if db is None else {"q": q, "db": db}
        status, body = self._request("POST", "/query", urllib.parse.urlencode(params).encode())
        if status != 200:
            raise RuntimeError(f"query {q!r} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def count(self, db: str, measurement: str = "request", field: str = "execution_time") -> int:
        """How many points of ``measurement`` the database holds."""
        result = self.query(f'SELECT count("{field}") FROM "{measurement}"', db)
        for statement in result.get("results", []):
            for series in statement.get("series", []):
                return int(series["values"][0][1])
        return 0

    def __enter__(self) -> Influxd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
