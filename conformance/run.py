"""``make conformance``: aiohttp's own functional tests, without and with lunamon.

1. Gets the sdist of the *installed* aiohttp (``pip download --no-binary :all:``) into
   ``.conformance/`` (kept between runs, gitignored) and extracts its ``tests/``,
   ``pytest.ini`` and ``README.rst`` (one test serves it), never its ``aiohttp/``
   package: the tests must import the installed one.
2. Runs the modules with the ``lunamon_conformance`` plugin: once as the baseline,
   once with lunamon on every served application (see that module).
3. A test that failed with lunamon but passed in the baseline is run twice more
   without lunamon: if it fails there too it is flaky and not ours.
4. Prints the summary lines and exits non-zero on a lunamon-only failure, a
   mismatch, an unrecorded request, a stale known bug, or when no test ran.

``python conformance/run.py [MODULE ...]`` (names like ``test_web_functional``);
``CONFORMANCE_MODULES`` does the same from the environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parent
CACHE: Final = REPO / ".conformance"

# The modules that serve applications over real sockets; the first six are the issue's.
MODULES: Final = (
    "test_web_functional",
    "test_web_sendfile_functional",
    "test_web_websocket_functional",
    "test_web_middleware",
    "test_web_urldispatcher",
    "test_web_server",
    "test_client_functional",  # ~400 more requests: streams, compression, TLS, timeouts
    "test_client_ws_functional",  # websockets from aiohttp's client's side
    "test_client_middleware",
    "test_client_middleware_digest_auth",
    "test_run_app",  # web.run_app, shutdown with handlers in flight
    "test_web_runner",
    "test_web_log",  # aiohttp's access logger, which the oracle wraps
    "test_test_utils",  # TestServer / TestClient themselves
)
RERUNS: Final = 2
# pytest exits 0 (all passed) or 1 (some failed: the baseline has failures of its own).
PYTEST_OK: Final = (0, 1)


def main(argv: list[str]) -> int:
    started = time.monotonic()
    modules = argv or os.environ.get("CONFORMANCE_MODULES", "").split() or list(MODULES)
    version = importlib.metadata.version("aiohttp")
    suite = fetch_tests(version)
    paths = [f"tests/{m.removesuffix('.py')}.py" for m in modules]
    print(f"conformance: aiohttp {version}'s tests ({suite}), {len(paths)} modules", flush=True)

    baseline_report = CACHE / "baseline.json"
    lunamon_report = CACHE / "lunamon.json"
    print("--- baseline: aiohttp's tests without lunamon", flush=True)
    if run_pytest(suite, "baseline", baseline_report, paths) not in PYTEST_OK:
        print("conformance: the baseline run did not complete")
        return 2
    print("--- with lunamon on every served application", flush=True)
    code = run_pytest(
        suite, "lunamon", lunamon_report, paths, ["--lunamon-baseline", str(baseline_report)]
    )
    if code not in PYTEST_OK:
        print("conformance: the lunamon run did not complete")
        return 2
    result: dict[str, Any] = json.loads(lunamon_report.read_text())

    flaky = rerun_in_baseline(suite, result["lunamon_only_failures"])
    if flaky:
        forget_flaky(result, flaky)
        print(f"--- failed without lunamon too when run again (flaky, not ours): {len(flaky)}")
        for nodeid in flaky:
            print(f"  {nodeid}")

    elapsed = time.monotonic() - started
    print(f"=== make conformance: aiohttp {version}, {len(paths)} modules, {elapsed:.0f} s ===")
    failed = report(result)
    verdicts = result["verdicts"]
    print(
        f"conformance: {verdicts['passed']} passed, {verdicts['failed']} failed,"
        f" {verdicts['skipped']} skipped"
    )
    return 1 if failed else 0


def report(result: dict[str, Any]) -> bool:
    """Print the summary lines; whether the run failed."""
    import lunamon_conformance

    for line in lunamon_conformance.summary_lines(result):
        print(line)
    problems = []
    if result["tests_run"] == 0:
        problems.append("no test ran")
    if result["stale_known_bugs"]:
        problems.append(f"stale known bugs: {len(result['stale_known_bugs'])}")
        for entry in result["stale_known_bugs"]:
            print(f"  no longer occurs (remove from KNOWN_BUGS): {entry}")
    for key, name in (
        ("lunamon_only_failures", "lunamon-only failures"),
        ("mismatches", "mismatches"),
        ("unrecorded", "unrecorded requests"),
    ):
        if result[key]:
            problems.append(f"{name}: {len(result[key])}")
    if problems:
        print(f"conformance FAILED: {', '.join(problems)}")
    return bool(problems)


def fetch_tests(version: str) -> Path:
    """``.conformance/aiohttp-<version>/``: the sdist's tests/, pytest.ini and README.rst."""
    suite = CACHE / f"aiohttp-{version}"
    if (suite / ".complete").exists():
        return suite
    dist = CACHE / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    sdist = dist / f"aiohttp-{version}.tar.gz"
    if not sdist.exists():
        print(f"conformance: downloading aiohttp {version}'s sdist", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"aiohttp=={version}",
                "-d",
                str(dist),
            ],
            check=True,
        )
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")  # below aiohttp-<version>/
            # test_static_file_directory_traversal_attack serves ../README.rst
            if inner in ("pytest.ini", "README.rst") or inner.startswith("tests/"):
                member.name = inner
                members.append(member)
        if not any(m.name == "tests/conftest.py" for m in members):
            raise SystemExit(f"conformance: {sdist.name} has no tests/conftest.py")
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))
        try:
            tar.extractall(tmp, members=members, filter="data")
            (tmp / ".complete").touch()
            if suite.exists():
                shutil.rmtree(suite)
            tmp.rename(suite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return suite


def run_pytest(
    suite: Path, mode: str, report_path: Path, tests: list[str], extra: list[str] | None = None
) -> int:
    """aiohttp's tests in ``suite`` with the plugin in ``mode``; pytest's exit code."""
    report_path.unlink(missing_ok=True)
    env = dict(os.environ)
    # Only the plugins named below: aiohttp's conftest loads aiohttp.pytest_plugin, which
    # pytest-aiohttp and pytest-asyncio (lunamon's own test tools) would fight with.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        "pytest.ini",
        "--rootdir",
        ".",
        # aiohttp's addopts want xdist and coverage; its own marker selection is kept.
        "-o",
        "addopts=",
        "-m",
        "not dev_mode and not autobahn and not internal",
        "--strict-markers",
        "-o",
        "timeout=60",
        "-p",
        "no:cacheprovider",
        "-p",
        "pytest_timeout",
        "-p",
        "pytest_mock",
        "-p",
        "lunamon_conformance",
        "-q",
        "--tb=short" if mode == "lunamon" else "--tb=no",
        "-rfE",
        "--lunamon-conformance",
        mode,
        "--lunamon-report",
        str(report_path),
        *(extra or []),
        *tests,
    ]
    code = subprocess.run(command, cwd=suite, env=env, check=False).returncode
    if not report_path.exists():
        return 3  # the session never reached its summary
    return code


def rerun_in_baseline(suite: Path, nodeids: list[str]) -> list[str]:
    """Of ``nodeids`` (failed with lunamon only), those that fail without it when rerun."""
    flaky: set[str] = set()
    if not nodeids:
        return []
    print(f"--- {len(nodeids)} lunamon-only failures: run {RERUNS} more times without lunamon")
    for attempt in range(RERUNS):
        report_path = CACHE / f"rerun-{attempt}.json"
        if run_pytest(suite, "baseline", report_path, nodeids) not in PYTEST_OK:
            continue
        outcomes = json.loads(report_path.read_text())["outcomes"]
        flaky.update(n for n in nodeids if outcomes.get(n) in ("failed", "xpassed"))
    return sorted(flaky)


def forget_flaky(result: dict[str, Any], flaky: list[str]) -> None:
    """Take tests found flaky without lunamon out of the comparison."""
    gone = set(flaky)
    result["lunamon_only_failures"] = [n for n in result["lunamon_only_failures"] if n not in gone]
    for key in ("mismatches", "unrecorded"):
        result[key] = [e for e in result[key] if e["test"] not in gone]
    compared = result["compared_by_test"]
    result["requests_compared"] -= sum(compared.pop(n, 0) for n in flaky)
    verdicts = result["verdicts"]
    verdicts["failed"] -= len(gone)
    verdicts["skipped"] += len(gone)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1:]))
