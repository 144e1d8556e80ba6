"""The compiled encoder (``lunamon._speedups``) gives the pure-Python encoder's bytes.

A normal install builds it (``make test`` does), so these tests fail, not skip,
when it is missing. ``LUNAMON_PURE_PYTHON=1`` switches back to the Python encoder.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_point import _field_value, _key, _series, _text

import lunamon.point as point_module
from lunamon import Point, encode_lines
from lunamon._speedups import encode_line as compiled_line
from lunamon._speedups import encode_lines as compiled
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
        "import lunamon.point as p, lunamon.sinks.clickhouse as c;"
        " print(p._encoder is p._encode_lines and p._line_encoder is p._encode,"
        " c._orjson is None)"
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
        assert done.stdout.split() == [pure, pure], value  # both speedups off, or both on


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
