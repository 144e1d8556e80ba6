"""Catalogue 20-24 and 26 through the real pipeline: handler code adds odd tags and fields
(``lunamon.add_tag`` / ``add_field``) or emits odd points, the middleware, flusher and
``InfluxDBSink`` carry them to a real influxd, and what is read back is exactly what the
documented policy (README "Line protocol", ``lunamon.point``) says: stored as given,
sanitised by the one rule, omitted and counted, or refused at record time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from _rel_support import (
    ClientFactory,
    assert_invariant,
    assert_served,
    drive,
    fast_policy,
    new_db,
    stored_rows,
)
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from servers import InfluxServer

import lunamon
import lunamon._recorder
import lunamon.timing
from lunamon import MONITORING_KEY, Monitoring, Point
from lunamon._validation import INT64_MAX, INT64_MIN, omitted_counts
from lunamon.demo.service import SUBSTEPS, create_app
from lunamon.sinks.influxdb import InfluxDBSink

Stored = tuple[str, int, dict[str, str], dict[str, Any]]
REFUSED = "refused"


def typed(rows: list[Stored]) -> list[tuple[Any, ...]]:
    """Rows comparable with their field types (1 == 1.0 == True in Python)."""
    out = [
        (s, t, dict(tags), {k: (type(v).__name__, v) for k, v in fields.items()})
        for s, t, tags, fields in rows
    ]
    return sorted(out, key=lambda row: (row[0], row[1]))


def _identifier(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_back(server: InfluxServer, db: str) -> list[Stored]:
    """Everything in ``db`` as (measurement, time_ns, tags, fields), one measurement at a time.

    (``SELECT * FROM /.*/`` leaves out measurements whose field shares its name, but not its
    type, with a field of another measurement.)
    """
    out: list[Stored] = []
    for measurement in server.column("SHOW MEASUREMENTS", db):
        name = _identifier(measurement)
        types = {
            row["fieldKey"]: row["fieldType"]
            for row in server.rows(f"SHOW FIELD KEYS FROM {name}", db)
        }
        result = server.query(f"SELECT * FROM {name} GROUP BY *", db)
        for statement in result.get("results", []):
            for series in statement.get("series", []):
                assert series["name"] == measurement
                tags = {k: v for k, v in (series.get("tags") or {}).items() if v != ""}
                for values in series["values"]:
                    row = dict(zip(series["columns"], values, strict=True))
                    time_ns = row.pop("time")
                    fields = {
                        k: float(v) if types[k] == "float" else v
                        for k, v in row.items()
                        if v is not None
                    }
                    out.append((measurement, time_ns, tags, fields))
    return out


async def stored(server: InfluxServer, db: str) -> list[Stored]:
    return await asyncio.to_thread(read_back, server, db)


def by_request_id(rows: list[Stored]) -> dict[str, Stored]:
    return {str(r[3]["request_id"]): r for r in rows if r[0] == "request"}


# --------------------------------------------------------------------------- a probe service


Probe = Callable[[web.Request], None]


def probe_app(db: str, server: InfluxServer, probes: dict[str, Probe]) -> web.Application:
    """A monitored app whose handler ``/probe/{case}`` runs one probe of the table and answers
    ``ok``, or the name of the exception the lunamon call raised (caught by the handler)."""

    async def handler(request: web.Request) -> web.Response:
        try:
            probes[request.match_info["case"]](request)
        except (TypeError, ValueError) as exc:
            return web.Response(text=type(exc).__name__)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/probe/{case}", handler)
    lunamon.setup(
        app,
        service="probe",
        sinks=[InfluxDBSink(server.host, server.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=1000),
    )
    return app


async def run_probes(
    client: Any, monitoring: Monitoring, cases: list[str]
) -> dict[str, tuple[str, dict[str, int]]]:
    """Each case once, in order: (what the handler answered, omitted_counts delta)."""
    out = {}
    for case in cases:
        before = omitted_counts()
        response = await client.post(f"/probe/{case}", headers={"Luna-Request-Id": f"id-{case}"})
        assert response.status == 200
        after = omitted_counts()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        out[case] = (await response.text(), delta)
    await monitoring.flush()
    stats = monitoring.stats()
    assert_invariant(stats)
    assert stats["influxdb"]["written"] == len(cases), stats
    return out


BASE_TAGS = {"service": "probe", "route": "POST:/probe/{case}", "status_code": "200"}


# --------------------------------------------------------------------------- 21: escaping matrix

# (name, text): each text put in every position a handler or a user point can reach.
SPECIALS = [
    ("comma", "x,y"),
    ("space", "x y"),
    ("equals", "x=y"),
    ("quote", 'x"y'),
    ("backslash", "x\\y"),
    ("two-backslashes", "x\\\\y"),
    ("backslash-comma", "x\\,y"),
    ("trailing-backslash", "xy\\"),
    ("newline", "x\ny"),
    ("cr", "x\ry"),
    ("crlf", "x\r\ny"),
    ("unicode", "ü€😀ñ"),
    ("hash", "#x"),
]

# What the policy says each position stores; REFUSED: a ValueError where it is recorded.
EXPECTED_TAG_VALUE = {
    "backslash-comma": "x\\\\,y",  # an odd run before a separator gets one more backslash
    "trailing-backslash": "xy",  # removed: 1.x cannot store it
    "newline": "x y",  # never a line break in a tag
    "cr": "x y",
    "crlf": "x y",
}
EXPECTED_KEY = {  # tag keys, field keys
    "backslash-comma": REFUSED,
    "trailing-backslash": REFUSED,
    "newline": REFUSED,
    "cr": REFUSED,
    "crlf": REFUSED,
}
EXPECTED_SERIES = {**EXPECTED_KEY, "hash": REFUSED}  # a leading '#' would be a comment


def _probe(call: Callable[..., None], *args: object) -> Probe:
    def probe(_request: web.Request) -> None:
        call(*args)

    return probe


def matrix_probes() -> dict[str, Probe]:
    probes: dict[str, Probe] = {}
    for name, text in SPECIALS:
        probes[f"tag-value-{name}"] = _probe(lunamon.add_tag, "probe", text)
        probes[f"tag-key-{name}"] = _probe(lunamon.add_tag, f"t{text}", "v")
        probes[f"field-key-{name}"] = _probe(lunamon.add_field, f"f{text}", "v")
        probes[f"string-field-{name}"] = _probe(lunamon.add_field, "s", text)
    return probes


async def test_21_escaping_matrix_read_back_from_influxd(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    app = probe_app(db, influxd, matrix_probes())
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    cases = list(matrix_probes())
    results = await run_probes(client, monitoring, cases)

    # series (measurement) names: user points emitted next to the requests
    series_expected: list[Stored] = []
    t0 = time.time_ns()
    for index, (name, text) in enumerate(SPECIALS):
        try:
            point = Point(text, t0 + index, {"case": name}, {"f": 1.0})
        except ValueError:
            assert EXPECTED_SERIES.get(name) == REFUSED, name
            continue
        assert name not in EXPECTED_SERIES, name
        monitoring.emit(point)
        series_expected.append((text, t0 + index, {"case": name}, {"f": 1.0}))
    await monitoring.flush()
    await client.close()
    assert_invariant(monitoring.stats())

    rows = await stored(influxd, db)
    requests = by_request_id(rows)
    for name, text in SPECIALS:
        tag_value = EXPECTED_TAG_VALUE.get(name, text)
        key = EXPECTED_KEY.get(name, text)
        want: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
            f"tag-value-{name}": ({**BASE_TAGS, "probe": tag_value}, {}),
            f"tag-key-{name}": ({**BASE_TAGS, f"t{key}": "v"} if key != REFUSED else BASE_TAGS, {}),
            f"field-key-{name}": (BASE_TAGS, {f"f{key}": "v"} if key != REFUSED else {}),
            f"string-field-{name}": (BASE_TAGS, {"s": text}),  # string fields keep everything
        }
        for case, (tags, fields) in want.items():
            answer = "ValueError" if key == REFUSED and "-key-" in case else "ok"
            assert results[case][0] == answer, case
            _, _, got_tags, got_fields = requests[f"id-{case}"]
            assert got_tags == tags, case
            extra = {
                k: v for k, v in got_fields.items() if k not in ("request_id", "execution_time")
            }
            assert extra == fields, case
    assert typed([r for r in rows if r[0] != "request"]) == typed(series_expected)
    assert influxd.field_types("request", db)["execution_time"] == "float"


# --------------------------------------------------------------------------- 22-24: policy

# case -> (probe, what the handler saw, tags added, fields added, omitted_counts delta)
PolicyCase = tuple[Probe, str, dict[str, str], dict[str, Any], dict[str, int]]

POLICY: dict[str, PolicyCase] = {
    "tag-newline": (lambda r: lunamon.add_tag("k", "a\nb"), "ok", {"k": "a b"}, {},
                    {"tag_sanitized": 1}),
    "tag-cr": (lambda r: lunamon.add_tag("k", "a\rb"), "ok", {"k": "a b"}, {},
               {"tag_sanitized": 1}),
    "tag-trailing-backslash": (lambda r: lunamon.add_tag("k", "ab\\"), "ok", {"k": "ab"}, {},
                               {"tag_sanitized": 1}),
    "tag-only-backslashes": (lambda r: lunamon.add_tag("k", "\\\\"), "ok", {}, {},
                             {"tag_sanitized": 1, "tag_empty": 1}),
    "tag-empty": (lambda r: lunamon.add_tag("k", ""), "ok", {}, {}, {"tag_empty": 1}),
    "tag-int": (lambda r: lunamon.add_tag("k", 200), "ok", {"k": "200"}, {}, {}),
    "tag-float": (lambda r: lunamon.add_tag("k", 0.5), "ok", {"k": "0.5"}, {}, {}),
    "tag-key-time": (lambda r: lunamon.add_tag("time", "x"), "ValueError", {}, {}, {}),
    "tag-key-newline": (lambda r: lunamon.add_tag("a\nb", "x"), "ValueError", {}, {}, {}),
    "tag-key-64k": (lambda r: lunamon.add_tag("k" * 65536, "x"), "ValueError", {}, {}, {}),
    "tag-key-int": (lambda r: lunamon.add_tag(5, "x"), "TypeError", {}, {}, {}),  # type: ignore[arg-type]
    "tag-object": (lambda r: lunamon.add_tag("k", object()), "TypeError", {}, {}, {}),  # type: ignore[arg-type]
    "field-nan": (lambda r: lunamon.add_field("ffloat", math.nan), "ok", {}, {},
                  {"field_nan_inf": 1}),
    "field-inf": (lambda r: lunamon.add_field("ffloat", math.inf), "ok", {}, {},
                  {"field_nan_inf": 1}),
    "field-neg-inf": (lambda r: lunamon.add_field("ffloat", -math.inf), "ok", {}, {},
                      {"field_nan_inf": 1}),
    "field-float": (lambda r: lunamon.add_field("ffloat", 1e-300), "ok", {}, {"ffloat": 1e-300},
                    {}),
    "field-int-over": (lambda r: lunamon.add_field("fint", INT64_MAX + 1), "ok", {}, {},
                       {"field_int_range": 1}),
    "field-int-under": (lambda r: lunamon.add_field("fint", INT64_MIN - 1), "ok", {}, {},
                        {"field_int_range": 1}),
    "field-int-max": (lambda r: lunamon.add_field("fint", INT64_MAX), "ok", {},
                      {"fint": INT64_MAX}, {}),
    "field-int-min": (lambda r: lunamon.add_field("fint", INT64_MIN), "ok", {},
                      {"fint": INT64_MIN}, {}),
    "field-none": (lambda r: lunamon.add_field("fnone", None), "ok", {}, {},  # type: ignore[arg-type]
                   {"field_none": 1}),
    "field-bool": (lambda r: lunamon.add_field("fbool", True), "ok", {}, {"fbool": True}, {}),
    "field-object": (lambda r: lunamon.add_field("fobj", object()), "TypeError", {}, {}, {}),  # type: ignore[arg-type]
    "field-bytes": (lambda r: lunamon.add_field("fobj", b"x"), "TypeError", {}, {}, {}),  # type: ignore[arg-type]
    "field-key-time": (lambda r: lunamon.add_field("time", 1.0), "ValueError", {}, {}, {}),
    "field-key-empty": (lambda r: lunamon.add_field("", 1.0), "ValueError", {}, {}, {}),
    "field-key-64k": (lambda r: lunamon.add_field("f" * 65536, 1.0), "ValueError", {}, {}, {}),
    "field-key-int": (lambda r: lunamon.add_field(1, 1.0), "TypeError", {}, {}, {}),  # type: ignore[arg-type]
    "field-key-trailing-backslash": (lambda r: lunamon.add_field("f\\", 1.0), "ValueError", {},
                                     {}, {}),
}  # fmt: skip


async def test_22_23_24_unrepresentable_values_follow_the_policy_in_influxd(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    app = probe_app(db, influxd, {case: probe for case, (probe, *_rest) in POLICY.items()})
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    results = await run_probes(client, monitoring, list(POLICY))
    await client.close()
    requests = by_request_id(await stored(influxd, db))
    assert len(requests) == len(POLICY)  # odd input never costs the request its point
    for case, (_probe, answer, tags, fields, counted) in POLICY.items():
        assert results[case] == (answer, counted), case
        _, _, got_tags, got_fields = requests[f"id-{case}"]
        assert got_tags == {**BASE_TAGS, **tags}, case
        extra = {
            k: (type(v).__name__, v)
            for k, v in got_fields.items()
            if k not in ("request_id", "execution_time")
        }
        assert extra == {k: (type(v).__name__, v) for k, v in fields.items()}, case
    assert influxd.field_types("request", db) == {
        "request_id": "string",
        "execution_time": "float",
        "ffloat": "float",
        "fint": "integer",
        "fbool": "boolean",
    }


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: Point("#comment", 1, {}, {"f": 1.0}), ValueError),
        (lambda: Point("m", 1, {}, {"f": math.nan}), ValueError),  # left without fields
        (lambda: Point("m", 1, {}, {"f": None}), ValueError),
        (lambda: Point("m", 1, {}, {}), ValueError),
        (lambda: Point("m", 1, {"time": "x"}, {"f": 1.0}), ValueError),
        (lambda: Point("m", 1, {}, {"time": 1.0}), ValueError),
        (lambda: Point("m", 1, {}, {"f": object()}), TypeError),
        (lambda: Point("m", 1, {}, {"f": [1]}), TypeError),
        (lambda: Point("m", 1, {("k",): "v"}, {"f": 1.0}), TypeError),  # type: ignore[dict-item]
        (lambda: Point("m", 1.5, {}, {"f": 1.0}), TypeError),  # type: ignore[arg-type]
        (lambda: Point("m", 2**63, {}, {"f": 1.0}), ValueError),
    ],
)
def test_22_23_24_points_refused_at_record_time(
    make: Callable[[], Point], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make()


class _FrozenClock(SimpleNamespace):
    """Stands for the ``time`` module in lunamon._recorder: one start instant, no duration."""


async def test_24_every_time_field_is_a_float_even_when_zero(
    aiohttp_client: ClientFactory, influxd: InfluxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = new_db()
    # The Python run, which reads the clock patched below (the compiled runner reads its own).
    monkeypatch.setattr(lunamon._recorder, "_compiled", None)
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=1000),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    paths = [
        "/detector",
        "/extractor",
        "/extractor/upgrade",
        "/handlers/h/events",
        "/verifiers/v/verifications",
    ]
    # every duration exactly 0: the first points of the shard pin the field types
    with monkeypatch.context() as patch:
        patch.setattr(lunamon.timing, "perf_counter", lambda: 100.0)
        patch.setattr(
            lunamon._recorder,
            "time",
            _FrozenClock(time_ns=time.time_ns, perf_counter=lambda: 100.0),
        )
        # The compiled begin reads the clock itself: its Python reference reads the above.
        patch.setattr(lunamon._recorder, "_begin", lunamon._recorder._py_begin)
        zero = await drive(client, 5, concurrency=1, paths=paths)
    await monitoring.flush()
    assert monitoring.stats()["influxdb"]["written"] == 5
    rows = await stored_rows(influxd, "SELECT * FROM request", db)
    all_fields = {"execution_time", *(f for steps in SUBSTEPS.values() for f in steps)}
    for row in rows:
        assert {row[k] for k in all_fields if row.get(k) is not None} == {0}
    # then real durations: same types, nothing refused
    later = await drive(client, 50, paths=paths)
    await monitoring.flush()
    await client.close()
    assert_served(zero + later)
    stats = monitoring.stats()["influxdb"]
    assert (stats["written"], stats["dropped"]["rejected"]) == (55, 0)
    types = influxd.field_types("request", db)
    assert types == {"request_id": "string", **dict.fromkeys(all_fields, "float")}


# --------------------------------------------------------------------------- 20: same instant


@pytest.mark.parametrize("clock", ["frozen", "real"])
async def test_20_identical_tags_in_the_same_millisecond_give_n_rows(
    aiohttp_client: ClientFactory,
    influxd: InfluxServer,
    monkeypatch: pytest.MonkeyPatch,
    clock: str,
) -> None:
    db = new_db()
    if clock == "frozen":  # every request starts at the very same nanosecond
        instant = time.time_ns()
        monkeypatch.setattr(
            lunamon._recorder,
            "time",
            _FrozenClock(time_ns=lambda: instant, perf_counter=time.perf_counter),
        )
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=1000),
    )
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    answers = await drive(client, 300, concurrency=50, paths=["/extractor"])
    await monitoring.flush()
    await client.close()
    assert_served(answers)
    rows = await stored_rows(influxd, 'SELECT "request_id" FROM "request"', db)
    assert sorted(r["request_id"] for r in rows) == sorted(a.request_id for a in answers)
    milliseconds = {r["time"] // 1_000_000 for r in rows}
    assert len(milliseconds) < len(rows)  # several points did share a millisecond


# --------------------------------------------------------------------------- 26: line injection

INJECTION = "x\nevil v=1 1"


async def test_26_crafted_request_path_injects_no_line(
    aiohttp_client: ClientFactory, influxd: InfluxServer
) -> None:
    db = new_db()
    app = create_app(
        sinks=[InfluxDBSink(influxd.host, influxd.port, db)],
        **fast_policy(flush_interval=30.0, batch_size=1000),
    )

    async def echo(request: web.Request) -> web.Response:
        lunamon.add_tag("probe", request.query["v"])
        lunamon.add_field("note", request.query["v"])
        return web.Response(text="ok")

    app.router.add_post("/echo", echo)
    monitoring = app[MONITORING_KEY]
    client = await aiohttp_client(app)
    statuses = []
    for path in [
        "/x%0Aevil%20v=1%201",
        "/x%0D%0Aevil%20v=1%201",
        "/handlers/x%0Aevil%20v=1%201/events",
        "/verifiers/x%0D%0Aevil%20v=1%201/verifications",
        "/echo?v=x%0Aevil%20v%3D1%201",
    ]:
        async with client.post(path) as response:
            statuses.append(response.status)
    await monitoring.flush()
    await client.close()
    assert statuses == [404, 404, 201, 201, 200]
    stats = monitoring.stats()
    assert_invariant(stats)
    assert stats["influxdb"]["written"] == 7  # five requests, two 404 error points
    measurements = influxd.column("SHOW MEASUREMENTS", db)
    assert sorted(measurements) == ["error", "request"]
    rows = {(r[2].get("route"), r[2].get("handler_id"), r[2].get("verifier_id"), r[2].get("probe"))
            for r in await stored(influxd, db) if r[0] == "request"}  # fmt: skip
    assert rows == {
        ("POST:<unmatched>", None, None, None),
        ("POST:/handlers/{handlerId}/events", "x evil v=1 1", None, None),
        ("POST:/verifiers/{verifierId}/verifications", None, "x evil v=1 1", None),
        ("POST:/echo", None, None, "x evil v=1 1"),
    }
    notes = await stored_rows(influxd, 'SELECT "note" FROM "request" WHERE "note" <> \'\'', db)
    assert [r["note"] for r in notes] == [INJECTION]  # a string field keeps the newline


# --------------------------------------------------------------------------- property test

_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
_SPECIAL = st.sampled_from([",", " ", "=", '"', "\\", "\n", "\r", "#", "ü", "😀"])
_text = st.text(alphabet=st.one_of(_CHARS, _SPECIAL), max_size=10)  # values: specials often
_name = st.text(alphabet=st.one_of(_CHARS, _CHARS, _CHARS, _CHARS, _SPECIAL), max_size=6)
_bad_key = st.sampled_from(["", "time", 7])


def _key(prefix: str) -> st.SearchStrategy[Any]:
    # prefixes keep tag and field keys apart (influxd reads a shared name ambiguously)
    good = _name.map(lambda t: prefix + t)
    return st.one_of(good, good, good, good, good, good, good, good, good, _bad_key)


_tag_value = st.one_of(_text, st.integers(), st.floats(), st.none())
_field_value = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(),
    _text,
    st.none(),
)
_series = _name.map(lambda t: "m" + t)
# A leading tab is left out here: influxd strips it, so it is refused (see TAB_CASES below).
_raw_series = _text.filter(lambda t: not t.startswith("\t"))
_point = st.tuples(
    st.one_of(_series, _series, _series, _series, _series, _raw_series),
    st.dictionaries(_key("t"), _tag_value, max_size=3),
    st.dictionaries(_key("f"), _field_value, min_size=1, max_size=3),
)


def _odd_backslash_run_before(text: str, separators: str) -> bool:
    run = 0
    for ch in text:
        if ch == "\\":
            run += 1
            continue
        if run % 2 and ch in separators:
            return True
        run = 0
    return False


def _key_problem(key: object) -> type[Exception] | None:
    """The documented key rules, written out independently of lunamon.point."""
    if not isinstance(key, str):
        return TypeError
    bad = (
        not key
        or key == "time"
        or "\n" in key
        or "\r" in key
        or len(key.encode()) > 65535
        or key.endswith("\\")
        or _odd_backslash_run_before(key, ",= ")
    )
    return ValueError if bad else None


def _tag_rule(value: object) -> str:
    text = str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " ").rstrip("\\")
    out, run = [], 0
    for ch in text:
        if ch == "\\":
            run += 1
            continue
        out.append("\\" * (run + (run % 2 if ch in ",= " else 0)) + ch)
        run = 0
    return "".join(out)


def _field_rule(value: object) -> tuple[bool, Any]:
    """(kept, value); not kept: omitted and counted."""
    if isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX, value
    if isinstance(value, float):
        return math.isfinite(value), value
    return False, value  # None


def expected_point(
    series: str, time_ns: int, tags: dict[Any, Any], fields: dict[Any, Any]
) -> Stored | type[Exception]:
    """What the policy says of a point: the row influxd stores, or the exception at record time."""
    problem = _key_problem(series)
    if problem is None and (
        series.startswith("#") or any(s in series for s in ("\\,", "\\ ", "\\="))
    ):
        problem = ValueError
    if problem is not None:
        return problem
    stored_tags = {}
    for key, value in tags.items():
        if (problem := _key_problem(key)) is not None:
            return problem
        if value is not None and (text := _tag_rule(value)):
            stored_tags[key] = text
    stored_fields = {}
    for key, value in fields.items():
        if (problem := _key_problem(key)) is not None:
            return problem
        kept, value = _field_rule(value)
        if kept:
            stored_fields[key] = float(value) if type(value) is float else value
    if not stored_fields:
        return ValueError
    return (series, time_ns, stored_tags, stored_fields)


@pytest.fixture
def fresh_db(influxd: InfluxServer) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(new_db())
        return made[-1]

    yield make
    for db in made:
        influxd.query(f'DROP DATABASE "{db}"')


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(points=st.lists(_point, min_size=1, max_size=3))
def test_22_property_random_points_read_back_exactly_as_the_policy_says(
    influxd: InfluxServer,
    fresh_db: Callable[[], str],
    points: list[tuple[str, dict[Any, Any], dict[Any, Any]]],
) -> None:
    db = fresh_db()
    t0 = time.time_ns() - 10**9
    made: list[Point] = []
    expected: list[Stored] = []
    for index, (raw_series, tags, fields) in enumerate(points):
        series = f"{raw_series}{index}"  # one measurement per point: no type conflicts
        want = expected_point(series, t0 + index, tags, fields)
        before = omitted_counts()
        try:
            outcome: object = Point(series, t0 + index, tags, fields)
        except (TypeError, ValueError) as exc:
            outcome = type(exc)
        if isinstance(want, type):
            assert outcome is want, (want, outcome)
            continue
        assert isinstance(outcome, Point), (want, outcome)
        point = outcome
        expected.append(want)
        made.append(point)
        after = omitted_counts()
        omitted_fields = sum(after[k] - before[k] for k in after if k.startswith("field_"))
        assert omitted_fields == len(fields) - len(want[3])
        assert after["tag_empty"] - before["tag_empty"] == sum(
            1 for v in tags.values() if v is not None and not _tag_rule(v)
        )
        # exactly one line per point: no newline outside a quoted string field
        line = point.to_line_protocol()
        assert line.count("\n") == sum(str(v).count("\n") for v in fields.values()
                                       if isinstance(v, str))  # fmt: skip

    async def write() -> None:
        sink = InfluxDBSink(influxd.host, influxd.port, db)
        try:
            await sink.start()
            if made:
                await sink.write(made)
        finally:
            await sink.close()

    event(f"points stored: {len(made)} of {len(points)}")
    asyncio.run(write())
    assert typed(read_back(influxd, db)) == typed(expected)


TAB_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # (series, tags, fields, what the policy says)
    ("\tm", {}, {"f": 1.0}, REFUSED),  # 1.x strips a leading tab from the series
    ("m", {}, {"\tg": 1.0, "h": 2.0}, REFUSED),  # and from the first field key
    ("m", {"\tt": "v"}, {"f": 1.0}, REFUSED),  # keys are checked alike
    ("m\tx", {}, {"f": 1.0}, "stored"),  # a tab anywhere else is stored as given
    ("m", {"t\tx": "v"}, {"f": 1.0}, "stored"),
    ("m", {}, {"h": 2.0, "g\tx": 1.0}, "stored"),
    ("m", {"t": "\tv"}, {"f": 1.0}, "stored"),  # values are not keys: kept
    ("m", {}, {"s": "\tstring"}, "stored"),
]


def test_22_leading_tab_in_series_or_key_is_refused_elsewhere_stored_as_given(
    influxd: InfluxServer, fresh_db: Callable[[], str]
) -> None:
    db = fresh_db()
    influxd.create_database(db)
    t0 = time.time_ns()
    made: list[Point] = []
    for index, (series, tags, fields, want) in enumerate(TAB_CASES):
        if want == REFUSED:
            with pytest.raises(ValueError, match="starts with a tab"):
                Point(series, t0 + index, tags, fields)
        else:
            made.append(Point(series, t0 + index, tags, fields))
    assert len(made) == 5

    async def write() -> None:
        sink = InfluxDBSink(influxd.host, influxd.port, db)
        try:
            await sink.write(made)
        finally:
            await sink.close()

    asyncio.run(write())
    expected = [(p.series, p.time_ns, dict(p.tags), dict(p.fields)) for p in made]
    assert typed(read_back(influxd, db)) == typed(expected)
