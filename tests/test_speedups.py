"""The compiled encoder (``lunamon._speedups``) gives the pure-Python encoder's bytes.

A normal install builds it (``make test`` does), so these tests fail, not skip,
when it is missing. ``LUNAMON_PURE_PYTHON=1`` switches back to the Python encoder.
"""

from __future__ import annotations

import contextvars
import gc
import os
import subprocess
import sys
import time
import uuid
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_point import _field_value, _key, _series, _text

import lunamon.point as point_module
from lunamon import Point, _ids, _speedups, encode_lines
from lunamon._recorder import _py_begin, _py_request_point
from lunamon._speedups import encode_line as compiled_line
from lunamon._speedups import encode_lines as compiled
from lunamon._speedups import float_repr
from lunamon.collector import RequestCollector
from lunamon.point import FieldValue, TagSet, _encode, _encode_lines


def _both(points: Any) -> bytes:
    """The two encoders' bytes for ``points``, checked equal, line by line too."""
    expected = _encode_lines(points)
    assert compiled(points) == expected
    for point in points:
        assert compiled_line(point) == _encode(point)
    return expected


def test_a_normal_install_encodes_with_the_compiled_encoder() -> None:
    assert point_module._encoder is compiled
    assert point_module._line_encoder is compiled_line
    points = [Point("request", 1, {"a": "b"}, {"x": 1.5})]
    assert encode_lines(points) == b"request,a=b x=1.5 1\n"
    assert points[0].to_line_protocol() == "request,a=b x=1.5 1"


def test_lunamon_pure_python_switches_the_compiled_encoder_and_orjson_off() -> None:
    code = (
        "import lunamon.point as p, lunamon.sinks.clickhouse as c, lunamon._ids as i,"
        " lunamon._recorder as r, lunamon.collector as k, lunamon.aiohttp as a;"
        " print(p._encoder is p._encode_lines and p._line_encoder is p._encode,"
        " c._orjson is None, i.point_time is i._point_time and i.request_id is i._request_id,"
        " r._request_point is r._py_request_point and r._begin is r._py_begin"
        " and k.RequestCollector.__base__ is k._CollectorFields and a._compiled is None)"
    )
    cases: list[tuple[str | None, str]] = [
        ("1", "True"),
        ("true", "True"),
        ("yes", "True"),
        ("on", "True"),
        (" ON ", "True"),
    ]
    cases += [("", "False"), ("0", "False"), ("no", "False"), (None, "False")]
    for value, pure in cases:
        env = {"PATH": "/usr/bin:/bin"}
        if value is not None:
            env["LUNAMON_PURE_PYTHON"] = value
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.split() == [pure] * 4, value  # every speedup off, or every one on


_tags = st.dictionaries(_key, _text, max_size=4)
_fields = st.dictionaries(_key, _field_value, min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            _series,
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            _tags,
            _fields,
            st.booleans(),
        ),
        max_size=8,
    )
)
def test_same_bytes_as_the_python_encoder(
    items: list[tuple[str, int, dict[str, str], dict[str, Any], bool]],
) -> None:
    points = [
        Point.trusted(series, time_ns, TagSet(tags) if shared else tags, fields)
        for series, time_ns, tags, fields, shared in items
    ]
    _both(points)
    _both(points)  # again, with every TagSet's head cached now


def test_floats_are_written_as_repr_writes_them() -> None:
    values = [0.1, 1e16, 1e-7, 123456789.123, -0.0, 5e-324, 1.7976931348623157e308, 2.0]
    body = _both([Point.trusted("s", 1, {}, {"x": v}) for v in values])
    assert body.decode().splitlines() == [f"s x={v!r} 1" for v in values]


@given(st.integers(min_value=1, max_value=4 * 10**15))
@settings(max_examples=3000, deadline=None)
def test_whole_nanoseconds_take_the_fast_path_and_still_read_as_repr(ns: int) -> None:
    value = ns / 1e9
    assert float_repr(value) == repr(value)


def test_float_text_is_repr_on_both_sides_of_every_fast_path_edge() -> None:
    edges = [1e-9, 9.99e-5, 1e-4, 0.000100001, 0.1, 1.0, 10.0, 123.456, 3999999.999999999]
    edges += [4e6, 4000000.000000001, 8388608.123456789, 9890151.083877267, 1e7, 1e16]
    edges += [0.0, -0.0, -1.5, 5e-10, 0.1 + 0.2, 1 / 3, 1e300, float("inf"), float("nan")]
    edges += [k / 1e9 + 1e-18 for k in (1, 12345, 100000, 999999999)]
    for value in edges:
        assert float_repr(value) == repr(value), value


def test_strings_escape_quotes_and_backslashes_and_keep_utf8() -> None:
    body = _both([Point.trusted("s", 1, {"t": "é ü"}, {"v": 'a"b\\c ☃'})])
    assert body == 's,t=é\\ ü v="a\\"b\\\\c ☃" 1\n'.encode()


def test_a_tagset_head_cached_for_another_series_is_not_used() -> None:
    tags = TagSet(service="svc")
    first = _both([Point.trusted("request", 1, tags, {"x": 1})])
    second = _both([Point.trusted("error", 2, tags, {"x": 1})])
    assert (first, second) == (b"request,service=svc x=1i 1\n", b"error,service=svc x=1i 2\n")
    assert tags._head == ("error", "error,service=svc")


def test_values_of_other_types_are_formatted_with_an_i_as_python_does() -> None:
    class Count(int):
        def __format__(self, spec: str) -> str:
            return "7"

    big = 2**70  # beyond int64: formatted, not converted
    body = _both([Point.trusted("s", big, {}, {"n": Count(3), "b": False, "i": -5})])
    assert body == f"s n=7i,b=false,i=-5i {big}\n".encode()


def test_other_shapes_go_through_the_python_encoder() -> None:
    fields = type("Fields", (dict,), {})(x=1.0)  # a dict subclass: the Python encoder's items()
    assert _both([Point.trusted("s", 1, {}, fields)]) == b"s x=1.0 1\n"
    assert _both([]) == b""
    assert _both(()) == b""
    assert _both(iter_points := (Point.trusted("s", 3, {}, {"x": 2}),)) == b"s x=2i 3\n"
    assert iter_points


def test_errors_are_the_python_encoders() -> None:
    lone_surrogate = [Point.trusted("s", 1, {}, {"v": "\ud800"})]
    with pytest.raises(UnicodeEncodeError):
        _encode_lines(lone_surrogate)
    with pytest.raises(UnicodeEncodeError):
        compiled(lone_surrogate)
    with pytest.raises(UnicodeEncodeError):
        compiled_line(lone_surrogate[0])
    five_items = [tuple.__new__(Point, ("s", 1, {}, {"x": 1}, "extra"))]
    with pytest.raises(ValueError, match="too many values"):
        compiled(five_items)
    with pytest.raises(TypeError):
        compiled(None)  # type: ignore[arg-type]


def test_a_value_that_changes_the_fields_while_written_does_not_crash_it() -> None:
    fields: dict[str, Any] = {}

    class Shrinking(int):
        def __format__(self, spec: str) -> str:
            fields.clear()  # Python's encoder raises; the compiled one must not crash
            return "1"

    fields.update(a=Shrinking(1), b=2.0, c="x")
    point = Point.trusted("s", 1, {}, fields)
    with pytest.raises(RuntimeError):
        _encode_lines([point])
    fields.update(a=Shrinking(1), b=2.0, c="x")
    assert compiled([point]).startswith(b"s a=1i")


def test_a_helper_that_fails_fails_the_call_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(key: str) -> str:
        raise KeyError(key)

    monkeypatch.setattr(point_module, "_field_key", broken)
    new_key = "a_key_never_encoded_before"
    point_module._field_key_cache.pop(new_key, None)
    with pytest.raises(KeyError):
        compiled([Point.trusted("s", 1, {}, {new_key: 1.0})])
    monkeypatch.undo()
    assert compiled([Point.trusted("s", 1, {}, {new_key: 1.0})]) == f"s {new_key}=1.0 1\n".encode()


def test_long_lines_outgrow_the_first_buffer_intact() -> None:
    # encode_line starts in a 512-byte buffer on the stack, encode_lines in 4 KB.
    for size in (500, 511, 512, 513, 5000):
        fields: dict[str, FieldValue] = {"text": "é" * size}
        fields.update({f"f{i}": i / 7 for i in range(40)})
        point = Point.trusted("s", 1, TagSet(k="v" * size), fields)
        line = compiled_line(point)
        assert line == _encode(point)
        assert len(line.encode()) > size
        assert _both([point] * 3).count(b"\n") == 3


def test_the_compiled_clock_and_ids_are_the_python_ones() -> None:
    """Point times and request ids: the extension keeps the state, _ids pushes it there."""
    assert _ids.point_time is _speedups.point_time
    held = _ids.current_slot()
    try:
        _ids._set_clock(0, 4321)
        compiled_times = [_ids.point_time(T) for T in (5_000_019_999, 5_000_010_000, 1, 7_000_000)]
        _ids._set_clock(0, 4321)
        python_times = [_ids._point_time(T) for T in (5_000_019_999, 5_000_010_000, 1, 7_000_000)]
        assert compiled_times == python_times
        assert compiled_times == [5_000_014_321, 5_000_024_321, 5_000_034_321, 5_000_044_321]
        _ids._set_clock(0, -1)  # no slot: the first point claims one
        assert _ids.point_time(10**12) % 10_000 == _ids.current_slot()
    finally:
        _ids._set_clock(0, held)
    first, second = _ids.request_id(1_764_979_200), _ids.request_id(1_764_979_200)
    assert first.startswith("1764979200," + _ids._id_prefix)
    assert int(second[-12:], 16) == (int(first[-12:], 16) + 1) & 0xFFFFFFFFFFFF
    assert uuid.UUID(first.split(",")[1]).version == 4
    _speedups.set_id_source(_ids._id_prefix, 0xFFFFFFFFFFFF)
    assert _ids.request_id(1) == f"1,{_ids._id_prefix}ffffffffffff"
    assert _ids.request_id(1) == f"1,{_ids._id_prefix}000000000000"  # 48 bits, wrapped
    assert _ids.request_id(-(2**63)) == f"{-(2**63)},{_ids._id_prefix}000000000001"
    assert _ids.request_id(2**63 - 1).startswith(f"{2**63 - 1},")
    with pytest.raises(ValueError, match="ASCII"):
        _speedups.set_id_source("é" * 4, 0)


def test_a_forked_child_gets_a_new_id_source_and_claims_its_own_slot() -> None:
    read, write = os.pipe()
    parent_slot = _ids.current_slot()
    pid = os.fork()
    if pid == 0:  # the child: reports its first id and slot, then leaves at once
        text = f"{_ids.request_id(1)} {_ids.point_time(10**15) % 10_000} {_ids.current_slot()}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id, child_time_slot, child_slot = os.read(read, 200).decode().split()
    os.close(read)
    assert not child_id.startswith("1," + _ids._id_prefix)
    assert child_time_slot == child_slot != str(parent_slot)


@given(
    st.sampled_from([200, 201, 404, 500]),
    st.lists(st.sampled_from(["handlerId", "verifierId", "x"]), max_size=3, unique=True),
    st.dictionaries(st.sampled_from(["handlerId", "verifierId", "y"]), _text, max_size=3),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e7, max_value=1e7),
    st.dictionaries(_key, st.floats(allow_nan=False), max_size=3),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_the_compiled_request_point_is_the_python_one(
    status: int,
    params: list[str],
    match_info: dict[str, str],
    elapsed: float,
    steps: dict[str, float],
    made: bool,
) -> None:
    key = (status, *map(match_info.get, params)) if params else status
    tag_sets = {key: TagSet(service="s", route="GET:/", status_code=str(status))} if made else {}
    args: tuple[Any, ...] = (
        Point,
        tag_sets,
        tuple(params),
        match_info,
        status,
        17,
        "i",
        elapsed,
        steps,
    )
    compiled_point = _speedups.request_point(*args)
    python_point = _py_request_point(*args)
    assert compiled_point == python_point
    assert type(compiled_point) is type(python_point)
    if made:
        assert compiled_point is not None
        assert compiled_point.tags is tag_sets[key]
        assert not gc.is_tracked(compiled_point)  # no collection walks a waiting point


def test_request_point_leaves_shapes_not_its_own_to_the_python_path() -> None:
    tags: dict[Any, TagSet] = {200: TagSet(service="s")}
    odd: Any = None
    assert _speedups.request_point(Point, tags, (), {}, 200, 1, "i", 0.5, {}) is not None
    assert _speedups.request_point(Point, tags, (), {}, 200, 1, "i", 1, {}) is None  # int
    assert _speedups.request_point(Point, tags, (), [], 200, 1, "i", 0.5, {}) is None
    assert _speedups.request_point(Point, tags, (), {}, 200, 1, "i", 0.5, odd) is None
    with pytest.raises(TypeError):
        _speedups.request_point(dict, tags, (), {}, 200, 1, "i", 0.5, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.request_point(*(Point, tags))  # type: ignore[call-arg]


def test_the_compiled_begin_is_the_python_one() -> None:
    """A request's start: point time, id (the client's when plausible), collector, context."""
    var: contextvars.ContextVar[Any] = contextvars.ContextVar("t", default=None)
    held = _ids.current_slot()
    try:
        for header in (None, "mine-1", "", "x" * 129, "bad\nid", "é", "x" * 128, " ~"):
            made = []
            for begin in (_speedups.begin, _py_begin):
                _ids._set_clock(0, 77)
                before = time.perf_counter()
                collector = begin(RequestCollector, "GET:/r", header, 5_000_000_001_234, var)
                assert before <= collector.started <= time.perf_counter()
                assert var.get() is collector
                var.reset(collector._token)
                assert var.get() is None
                made.append(collector)
            compiled, python = made
            assert type(compiled) is type(python) is RequestCollector
            assert compiled._start_ns == python._start_ns == 5_000_000_000_077
            assert compiled.route == python.route == "GET:/r"
            text = header or ""
            if 0 < len(text) <= 128 and text.isascii() and text.isprintable():
                assert compiled.request_id == python.request_id == header
            else:
                assert compiled.request_id.startswith("5000," + _ids._id_prefix)
                assert python.request_id.startswith("5000," + _ids._id_prefix)
            for collector in made:
                assert collector.steps == {}
                assert (
                    collector.extra_tags is collector.extra_fields is collector.sent_status is None
                )
                assert collector.ended == 0.0
    finally:
        _ids._set_clock(0, held)
    with pytest.raises(TypeError):
        _speedups.begin(dict, "GET:/r", None, 1, var)
    with pytest.raises(TypeError):
        _speedups.begin(RequestCollector, "GET:/r", None, 1, "not a context variable")


class _Marker:
    """Something a weak reference can follow."""


def test_compiled_collectors_are_collected_and_keep_their_type_alive() -> None:
    """The fields type is static, RequestCollector a heap subclass: no reference of the
    type is lost or kept per collector, and a cycle through a collector is collected."""
    before = sys.getrefcount(RequestCollector)
    for _ in range(2000):
        collector = RequestCollector("GET:/r", "id")
        cycle: Any = {"me": collector}
        collector.extra_fields = cycle  # a cycle through the collector
    del collector, cycle
    gc.collect()
    assert sys.getrefcount(RequestCollector) == before
    probe = RequestCollector("GET:/r", "id")
    marker = _Marker()
    ref = weakref.ref(marker)
    cycle = {"me": probe, "marker": marker}
    probe.extra_fields = cycle
    del cycle, marker
    del probe
    gc.collect()
    assert ref() is None
