"""pytest plugin: aiohttp's own test-suite, with lunamon on every served application.

``conformance/run.py`` (``make conformance``) loads it with ``-p lunamon_conformance``
into two runs of aiohttp's functional tests:

``--lunamon-conformance=baseline``
    aiohttp's tests as they are, plus the oracle (below); the outcome of every test
    is written to ``--lunamon-report``.
``--lunamon-conformance=lunamon``
    the same, and every served ``web.Application`` gets ``lunamon.setup(app,
    service="conformance", sinks=[MemorySink()], exclude=[])``. Every point is
    captured (``lunamon.testing.capture_points``); at the end of the session the
    ``request`` points are compared with the oracle, the outcomes with the baseline's
    (``--lunamon-baseline``), and the report ends with the summary lines.

Where lunamon is injected: ``AppRunner.__init__``. Every served ``Application`` passes
through an ``AppRunner`` (``TestServer``, so the ``aiohttp_client`` and
``aiohttp_server`` fixtures; ``web.run_app``; tests that build their own runner),
before it is frozen, and only the *root* application does. A sub-application
(``add_subapp``, ``add_domain``) is a ``web.Application`` too, but a service calls
``setup`` on the application it serves, whose middleware already sees the
sub-application's requests: patching ``Application.__init__`` would instrument both
and record every sub-application request twice. Low-level ``web.Server`` apps
(``aiohttp_raw_server``) use a ``ServerRunner`` and stay as they are.

The oracle is aiohttp's access log. The runner's ``access_log_class`` (aiohttp's
``AccessLogger``, or the one a test passes) is replaced by a subclass that logs
exactly when it would have, and also notes, for every request aiohttp finishes, the
test, method, path, the status of the response aiohttp sent and its
``Luna-Request-Id`` header, which is the key to the request's point (lunamon echoes
the point's ``request_id`` field there). It is installed in both runs, so lunamon is
the only difference between them. Requests aiohttp answered without running the
application (its own 400 for a request it could not parse: no ``match_info``) and
requests on applications without lunamon are counted, not compared.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web, web_protocol, web_runner
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger

OPTION: Final = "--lunamon-conformance"
HEADER: Final = "Luna-Request-Id"
SERVICE: Final = "conformance"
OUTSIDE: Final = "<outside any test>"

# Tests that fail with lunamon only because they compare a response's full header list,
# which then holds lunamon's documented `Luna-Request-Id`. xfail(strict=True) in the
# lunamon run: a test that passes again must leave the list. nodeid prefix -> reason.
HEADER_LIST_TESTS: Final[dict[str, str]] = {
    "tests/test_client_functional.py::test_raw_headers[": (
        "compares resp.raw_headers with (Content-Length, Date, Server)"
    ),
    "tests/test_client_functional.py::test_empty_header_values[": (
        "compares resp.raw_headers with (X-Empty, Content-Length, Date, Server)"
    ),
}

# Genuine lunamon bugs this run found, listed as known so that the target is green
# until they are fixed: (nodeid prefix, method, status sent) -> the bug. Their
# requests are shown as "known", not counted as mismatches/unrecorded; an entry that
# no longer occurs fails the run ("stale"), so a fixed bug leaves the list.
KNOWN_BUGS: Final[dict[tuple[str, str, int], str]] = {}


@dataclasses.dataclass(slots=True)
class Seen:
    """One request as aiohttp's access log saw it."""

    test: str
    method: str
    path: str
    status: int
    request_id: str | None
    handled: bool  # the application ran (match_info set): not aiohttp's own error answer
    monitored: bool  # the application has lunamon


@dataclasses.dataclass(slots=True)
class Recorded:
    """One ``request`` point, with the test it was emitted in."""

    test: str
    request_id: str
    status: str
    route: str


class _State:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.test = OUTSIDE
        self.seen: list[Seen] = []
        self.points: list[Any] = []  # the capture_points() list in the lunamon run
        self.recorded: list[Recorded] = []
        self.outcomes: dict[str, str] = {}
        self.unmonitored_apps: list[tuple[str, str]] = []  # (test, why setup failed)
        self.marked: dict[str, str] = {}  # nodeid -> documented difference
        self.requests: Counter[str] = Counter()  # test -> requests a monitored app ran for


_state: _State | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lunamon-conformance")
    group.addoption(
        OPTION,
        choices=("baseline", "lunamon"),
        default=None,
        help="baseline: aiohttp's tests with the oracle only; lunamon: with lunamon too",
    )
    group.addoption("--lunamon-report", default=None, help="where to write the JSON report")
    group.addoption(
        "--lunamon-baseline", default=None, help="the baseline run's report (lunamon run)"
    )


# --- the oracle ---------------------------------------------------------------------------


def _observe(request: Any, response: web.StreamResponse) -> None:
    state = _state
    if state is None:
        return
    handled = getattr(request, "_match_info", None) is not None
    monitored = _monitored(request)
    request_id = response.headers.get(HEADER)
    if request_id is None and monitored:
        # A client-sent id, when plausible, is the request's id: the point has it.
        request_id = request.headers.get(HEADER)
    state.seen.append(
        Seen(
            test=state.test,
            method=request.method,
            path=request.raw_path[:120],
            status=response.status,
            request_id=request_id,
            handled=handled,
            monitored=monitored,
        )
    )


_oracle_classes: dict[type[AbstractAccessLogger], type[AbstractAccessLogger]] = {}


def _oracle_class(base: type[AbstractAccessLogger]) -> type[AbstractAccessLogger]:
    """``base``, which also shows the oracle every request aiohttp finishes."""
    cls = _oracle_classes.get(base)
    if cls is None:

        class Oracle(base):  # type: ignore[valid-type,misc]
            __slots__ = ("_lunamon_base_enabled",)

            def __init__(self, logger: Any, log_format: str) -> None:
                super().__init__(logger, log_format)
                # aiohttp reads `enabled` once, when it makes the connection's handler:
                # the wrapped logger is called exactly when it would have been.
                self._lunamon_base_enabled: bool = super().enabled

            @property
            def enabled(self) -> bool:
                return True  # so that aiohttp calls log() for every request

            def log(self, request: Any, response: web.StreamResponse, time: float) -> None:
                _observe(request, response)
                if self._lunamon_base_enabled:
                    super().log(request, response, time)

        Oracle.__name__ = Oracle.__qualname__ = f"LunamonOracle{base.__name__}"
        cls = _oracle_classes[base] = Oracle
    return cls


def _monitored(request: Any) -> bool:
    """Whether the application ran for ``request`` (``match_info`` set) and has lunamon."""
    if _state is None or _state.mode != "lunamon":
        return False  # the baseline never imports lunamon
    if getattr(request, "_match_info", None) is None or not isinstance(request, web.Request):
        return False
    from lunamon.aiohttp import MONITORING_KEY

    return MONITORING_KEY in request.config_dict


def _patch_request_counter() -> Callable[[], None]:
    """Count, per test, the requests that reached a monitored application, logged or
    not (a handler cancelled, a client gone): the number of points to expect."""
    original = web_protocol.RequestHandler._handle_request

    async def _handle_request(self: Any, request: Any, *args: Any) -> Any:
        test = _state.test if _state is not None else OUTSIDE
        try:
            return await original(self, request, *args)
        finally:
            if _state is not None and _monitored(request):
                _state.requests[test] += 1

    web_protocol.RequestHandler._handle_request = _handle_request  # type: ignore[method-assign,assignment]

    def undo() -> None:
        web_protocol.RequestHandler._handle_request = original  # type: ignore[method-assign]

    return undo


# --- injection ----------------------------------------------------------------------------


def _patch_app_runner(with_lunamon: bool) -> Callable[[], None]:
    original = web_runner.AppRunner.__init__

    def __init__(self: web_runner.AppRunner, app: web.Application, **kwargs: Any) -> None:
        kwargs["access_log_class"] = _oracle_class(kwargs.get("access_log_class", AccessLogger))
        original(self, app, **kwargs)
        if with_lunamon and isinstance(app, web.Application):
            _setup_lunamon(app)

    web_runner.AppRunner.__init__ = __init__  # type: ignore[method-assign]

    def undo() -> None:
        web_runner.AppRunner.__init__ = original  # type: ignore[method-assign]

    return undo


def _setup_lunamon(app: web.Application) -> None:
    import lunamon
    from lunamon.aiohttp import MONITORING_KEY

    if MONITORING_KEY in app:  # served a second time
        return
    try:
        lunamon.setup(app, service=SERVICE, sinks=[lunamon.MemorySink()], exclude=[])
    except Exception as exc:  # e.g. an app a test froze itself: listed, never hidden
        assert _state is not None
        _state.unmonitored_apps.append((_state.test, repr(exc)[:200]))


# --- pytest hooks -------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    global _state
    mode = config.getoption(OPTION)
    if mode is None:
        return
    _state = _State(mode)
    config.add_cleanup(_patch_app_runner(with_lunamon=mode == "lunamon"))
    config.add_cleanup(_patch_request_counter())
    if mode == "lunamon":
        from lunamon.testing import capture_points

        capture = capture_points()
        _state.points = capture.__enter__()

        def stop_capture() -> None:
            capture.__exit__(None, None, None)

        config.add_cleanup(stop_capture)


def _documented(nodeid: str) -> str | None:
    for prefix, reason in HEADER_LIST_TESTS.items():
        if nodeid.startswith(prefix):
            return f"documented difference (Luna-Request-Id in the header list): {reason}"
    return None


def _known_bug(test: str, method: str, status: int | None) -> str | None:
    for (prefix, known_method, known_status), bug in KNOWN_BUGS.items():
        if test.startswith(prefix) and method == known_method and status == known_status:
            return bug
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _state is None or _state.mode != "lunamon":
        return
    for item in items:
        reason = _documented(item.nodeid)
        if reason is not None:
            _state.marked[item.nodeid] = reason
            item.add_marker(pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    state = _state
    if state is None:
        return (yield)
    # Anything between two tests (a straggling handler) belongs to the one before.
    _drain(state)
    state.test = item.nodeid
    try:
        return (yield)
    finally:
        # A response aiohttp prepares after the handler is recorded when the request's
        # task ends, which it has by the test's teardown (its server is closed).
        _drain(state)


def _drain(state: _State) -> None:
    """Move the captured ``request`` points to ``recorded``, in ``state.test``'s name."""
    for point in state.points:
        if point.series == "request":
            state.recorded.append(
                Recorded(
                    test=state.test,
                    request_id=str(point.fields.get("request_id")),
                    status=point.tags.get("status_code", "?"),
                    route=point.tags.get("route", "?"),
                )
            )
    del state.points[:]  # kept as `recorded`: memory stays flat


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _state
    if state is None:
        return
    if report.failed:
        outcome = "failed"
    elif hasattr(report, "wasxfail"):
        outcome = "xpassed" if report.passed else "xfailed"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return  # a setup or teardown that passed says nothing new
    if outcome != "failed" and state.outcomes.get(report.nodeid) in (
        "failed",
        "skipped",
        "xfailed",
    ):
        return  # a teardown's pass does not undo what the call said
    state.outcomes[report.nodeid] = outcome


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = _state
    if state is None:
        return
    baseline: dict[str, str] | None = None
    baseline_path = config.getoption("--lunamon-baseline")
    if state.mode == "lunamon" and baseline_path:
        baseline = json.loads(Path(baseline_path).read_text())["outcomes"]
    _drain(state)
    result = summarize(state, baseline)
    report_path = config.getoption("--lunamon-report")
    if report_path:
        Path(report_path).write_text(json.dumps(result, indent=1, sort_keys=True))
    if state.mode == "lunamon":
        terminalreporter.write_line("")
        for line in render(result):
            terminalreporter.write_line(line)


# --- comparison ---------------------------------------------------------------------------

_RAN: Final = frozenset({"passed", "failed", "xfailed", "xpassed"})


def summarize(state: _State, baseline: dict[str, str] | None) -> dict[str, Any]:
    """The run's outcomes and, with lunamon, its comparison with the oracle and baseline."""
    outcomes = state.outcomes
    result: dict[str, Any] = {
        "mode": state.mode,
        "outcomes": outcomes,
        "tests_run": sum(1 for outcome in outcomes.values() if outcome in _RAN),
        "requests_seen": len(state.seen),
    }
    if state.mode != "lunamon":
        return result
    baseline = baseline or {}
    # Not ours: what fails (or passes against its xfail) without lunamon.
    not_ours = {n: o for n, o in sorted(baseline.items()) if o in ("failed", "xpassed")}
    lunamon_only = sorted(
        nodeid
        for nodeid, outcome in outcomes.items()
        if outcome in ("failed", "xpassed") and nodeid not in not_ours
    )

    by_id: dict[str, list[Recorded]] = defaultdict(list)
    for rec in state.recorded:
        by_id[rec.request_id].append(rec)
    responses_per_id = Counter(s.request_id for s in state.seen if s.request_id is not None)

    compared: Counter[str] = Counter()  # per test
    statuses: Counter[int] = Counter()
    excluded: Counter[str] = Counter()
    mismatches: list[dict[str, Any]] = []
    unrecorded: list[dict[str, Any]] = []
    known: list[dict[str, Any]] = []
    for seen in state.seen:
        if not seen.handled:
            excluded["aiohttp answered without the application (its own 400)"] += 1
            continue
        if not seen.monitored:
            excluded["the application has no lunamon"] += 1
            continue
        if seen.test in not_ours:
            excluded["the test fails in the baseline"] += 1
            continue
        compared[seen.test] += 1
        statuses[seen.status] += 1
        entry: dict[str, Any] = {
            "test": seen.test,
            "method": seen.method,
            "path": seen.path,
            "sent": seen.status,
            "request_id": seen.request_id,
        }
        points = by_id.get(seen.request_id, []) if seen.request_id is not None else []
        problems: list[dict[str, Any]] | None = None
        if seen.request_id is None:
            entry["why"] = f"the response has no {HEADER} header"
            problems = unrecorded
        elif not points:
            entry["why"] = "no request point with this request_id"
            problems = unrecorded
        else:
            entry["recorded"] = [p.status for p in points]
            if len(points) > 1:
                entry["why"] = f"recorded {len(points)} times"
                problems = mismatches
            elif responses_per_id[seen.request_id] > 1:
                entry["why"] = f"{responses_per_id[seen.request_id]} responses carry this id"
                problems = mismatches
            elif points[0].status != str(seen.status):
                entry["why"] = "status differs"
                problems = mismatches
        if problems is not None:
            bug = _known_bug(seen.test, seen.method, seen.status)
            if bug is not None:
                entry["known"] = bug
                problems = known
            problems.append(entry)

    # Points of requests aiohttp did not log (a handler cancelled, a client gone):
    # not compared; a request recorded twice is a mismatch wherever it is.
    unlogged: Counter[str] = Counter()
    unlogged_points: list[tuple[str, str, str]] = []
    for request_id, recs in by_id.items():
        if request_id in responses_per_id:  # compared above, or left out on purpose
            continue
        unlogged.update(rec.status for rec in recs)
        unlogged_points.extend((rec.test, rec.route, rec.status) for rec in recs)
        if len(recs) > 1 and recs[0].test not in not_ours:
            mismatches.append(
                {
                    "test": recs[0].test,
                    "method": recs[0].route.split(":", 1)[0],
                    "path": recs[0].route.split(":", 1)[-1],
                    "sent": None,
                    "request_id": request_id,
                    "recorded": [rec.status for rec in recs],
                    "why": f"recorded {len(recs)} times (not in the access log)",
                }
            )

    # Exactly once, counted: per test, the points against the requests a monitored app
    # ran for, less what the comparison above already explains.
    points_per_test = Counter(rec.test for rec in state.recorded)
    explained: Counter[str] = Counter()
    for entry in mismatches + unrecorded + known:  # each is one request: k points, k - 1
        explained[entry["test"]] += len(entry.get("recorded") or ()) - 1
    for test in sorted(set(points_per_test) | set(state.requests)):
        if test in not_ours:
            continue
        residual = points_per_test[test] - state.requests[test] - explained[test]
        if residual == 0:
            continue
        entry = {
            "test": test,
            "method": "*",
            "path": "*",
            "sent": None,
            "request_id": None,
            "recorded": None,
            "why": (
                f"{state.requests[test]} requests reached a monitored application,"
                f" {points_per_test[test]} request points"
            ),
        }
        (mismatches if residual > 0 else unrecorded).append(entry)

    ran = [nodeid for nodeid, outcome in outcomes.items() if outcome in _RAN]
    stale = sorted(
        f"{prefix} {method} {status}"
        for (prefix, method, status) in KNOWN_BUGS
        if any(nodeid.startswith(prefix) for nodeid in ran)
        and not any(
            e["test"].startswith(prefix) and e["method"] == method and e["sent"] == status
            for e in known
        )
    )
    failing_tests = set(lunamon_only) | {e["test"] for e in mismatches + unrecorded}
    verdicts: Counter[str] = Counter()
    for nodeid, outcome in outcomes.items():
        if outcome == "skipped" or nodeid in not_ours or nodeid in state.marked:
            verdicts["skipped"] += 1
        elif nodeid in failing_tests:
            verdicts["failed"] += 1
        else:
            verdicts["passed"] += 1
    result.update(
        {
            "baseline_not_ours": not_ours,
            "lunamon_only_failures": lunamon_only,
            "marked": state.marked,
            "requests_compared": sum(compared.values()),
            "compared_by_test": dict(compared),
            "compared_statuses": {str(k): v for k, v in sorted(statuses.items())},
            "requests_excluded": dict(excluded),
            "mismatches": mismatches,
            "unrecorded": unrecorded,
            "known": known,
            "stale_known_bugs": stale,
            "points_not_in_access_log": dict(unlogged),
            "points_not_in_access_log_list": sorted(unlogged_points),
            "unmonitored_apps": state.unmonitored_apps,
            "verdicts": {k: verdicts[k] for k in ("passed", "failed", "skipped")},
            "requests_reaching_apps": sum(state.requests.values()),
            "request_points": len(state.recorded),
        }
    )
    return result


def describe(entry: dict[str, Any]) -> str:
    """One mismatch / unrecorded / known request, on one line."""
    if entry["method"] == "*":  # a count, not one request
        return f"  {entry['why']} [{entry['test']}]"
    recorded = entry.get("recorded")
    got = ",".join(recorded) if recorded else "nothing"
    return (
        f"  {entry['method']} {entry['path']}: sent {entry['sent']}, recorded {got}"
        f" ({entry['why']}) [{entry['test']}]"
    )


def render(result: dict[str, Any]) -> Iterator[str]:
    """The lunamon run's report, ending with the summary lines."""
    yield "=== lunamon conformance: aiohttp's own tests, with lunamon on every app ==="
    not_ours = result["baseline_not_ours"]
    yield f"failing in the baseline, not compared: {len(not_ours)}"
    for nodeid, outcome in not_ours.items():
        yield f"  {outcome} without lunamon: {nodeid}"
    yield f"documented differences (xfail): {len(result['marked'])}"
    for nodeid, reason in result["marked"].items():
        yield f"  {nodeid}: {reason}"
    if result["unmonitored_apps"]:
        yield f"applications lunamon could not be set up on: {len(result['unmonitored_apps'])}"
        for test, why in result["unmonitored_apps"]:
            yield f"  {test}: {why}"
    text = ", ".join(f"{status}: {n}" for status, n in result["compared_statuses"].items())
    yield f"statuses sent, of the requests compared: {text}"
    for why, count in sorted(result["requests_excluded"].items()):
        yield f"requests not compared, {why}: {count}"
    unlogged = result["points_not_in_access_log"]
    if unlogged:
        text = ", ".join(f"{status}: {n}" for status, n in sorted(unlogged.items()))
        yield f"points of requests aiohttp did not log (cancelled, client gone): {text}"
    if result["known"]:
        yield f"known lunamon bugs, not counted: {len(result['known'])}"
        for entry in result["known"]:
            yield describe(entry)
        for bug in sorted({entry["known"] for entry in result["known"]}):
            yield f"  - {bug}"
    if result["stale_known_bugs"]:
        yield "known lunamon bugs that no longer occur (remove them from KNOWN_BUGS):"
        for entry in result["stale_known_bugs"]:
            yield f"  {entry}"
    if result["lunamon_only_failures"]:
        yield "lunamon-only failures:"
        for nodeid in result["lunamon_only_failures"]:
            yield f"  {nodeid}"
    if result["mismatches"]:
        yield "mismatches:"
        yield from map(describe, result["mismatches"])
    if result["unrecorded"]:
        yield "unrecorded:"
        yield from map(describe, result["unrecorded"])
    yield from summary_lines(result)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The lines ``make conformance`` ends with."""
    return [
        f"tests run: {result['tests_run']}",
        f"lunamon-only failures: {len(result['lunamon_only_failures'])}",
        f"requests compared: {result['requests_compared']}",
        f"mismatches: {len(result['mismatches'])}",
        f"unrecorded: {len(result['unrecorded'])}",
    ]
