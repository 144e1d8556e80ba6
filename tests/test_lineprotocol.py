"""The streaming line-protocol reader gives what the exact parser gives, line numbers
included, whatever the input: the report and send read files through it."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_point import _field_value, _key, _series, _text
from test_sink_influxdb import escaping_matrix

from lunamon import LineProtocolError, Point, encode_lines
from lunamon.lineprotocol import iter_line_protocol, parse_line_protocol


def streamed(text: str) -> list[Point]:
    return list(iter_line_protocol(io.StringIO(text)))


def test_the_escaping_matrix_streams_as_it_parses() -> None:
    text = encode_lines(escaping_matrix()).decode()
    assert streamed(text) == parse_line_protocol(text) == escaping_matrix()


def test_fast_lines_and_oddities() -> None:
    text = (
        "# a comment\n"
        "\n"
        'request,service=svc,route=POST:/x,status_code=200 request_id="1,a b=c",'
        "execution_time=0.25,n=3i,ok=t,bad=F 1700000000000000001\n"
        "   \n"
        'quoted,tag=a"b s="x" 2\n'  # a quote in a tag value is no string field
        'multi s="first\nsecond",f=1.5 3\n'  # a raw newline inside a string field
        "neg f=-1e-3 -4\r\n"
    )
    points = streamed(text)
    assert points == parse_line_protocol(text)
    assert points[0].fields == {
        "request_id": "1,a b=c",
        "execution_time": 0.25,
        "n": 3,
        "ok": True,
        "bad": False,
    }
    assert points[2].fields["s"] == "first\nsecond"
    assert points[3].time_ns == -4


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("ok f=1 1\nbroken 2\n", 2),
        ("ok f=1 1\n\nx f=nan 3\n", 3),
        ("ok f=1 1\nx f=1 notatime\n", 2),
        ('ok f=1 1\nx s="never closed 5\n', 2),
        ("ok f=1 1\nx f=1i2 5\n", 2),
    ],
)
def test_errors_are_the_parsers_own(text: str, line: int) -> None:
    with pytest.raises(LineProtocolError) as parsed:
        parse_line_protocol(text)
    with pytest.raises(LineProtocolError) as streamed_error:
        streamed(text)
    assert str(streamed_error.value) == str(parsed.value)
    assert str(parsed.value).startswith(f"line {line}: ")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            _series,
            st.integers(min_value=-(2**62), max_value=2**62),
            st.dictionaries(_key, st.one_of(_text, st.integers()), max_size=3),
            st.dictionaries(_key, _field_value, min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_property_streaming_equals_parsing(rows: list[tuple[str, int, dict, dict]]) -> None:  # type: ignore[type-arg]
    points = [Point(*row) for row in rows]
    text = encode_lines(points).decode()
    assert streamed(text) == parse_line_protocol(text) == points
