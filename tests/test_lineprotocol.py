"""The streaming line-protocol reader gives what the exact parser gives, line numbers
included, whatever the input: the report and send read files through it."""

from __future__ import annotations

import io
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_point import _field_value, _key, _series, _text
from test_sink_influxdb import escaping_matrix

from lunamon import LineProtocolError, Point, encode_lines
from lunamon.lineprotocol import LineReader, NotTextError, iter_line_protocol, parse_line_protocol


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


# Rows of random points: (series, time_ns, tags, fields).
ROWS = st.lists(
    st.tuples(
        _series,
        st.integers(min_value=-(2**62), max_value=2**62),
        st.dictionaries(_key, st.one_of(_text, st.integers()), max_size=3),
        st.dictionaries(_key, _field_value, min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(ROWS)
def test_property_streaming_equals_parsing(rows: list[tuple[str, int, dict, dict]]) -> None:  # type: ignore[type-arg]
    points = [Point(*row) for row in rows]
    text = encode_lines(points).decode()
    assert streamed(text) == parse_line_protocol(text) == points


# --------------------------------------------------------------------------- LineReader


class Trickle:
    """A binary stream that returns at most ``step`` bytes a read: every line, and every
    multi-byte character, gets split over two reads somewhere."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = data
        self.step = step
        self.pos = 0
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        chunk = self.data[self.pos : self.pos + min(size, self.step)]
        self.pos += len(chunk)
        return chunk


def read_points(data: bytes, step: int = 1 << 20) -> list[Point]:
    return list(LineReader(Trickle(data, step)).points())


LUNAMON_LINES = (
    'request,service=svc,route=POST:/x,status_code=201 request_id="1,a b=c",'
    "execution_time=0.25,save_time=1e-05 1700000000000000001\n"
    'error,service=svc,route=POST:/x,status_code=500,error_code=1 request_id="1,a" 2\n'
)
ODD_LINES = (
    "# a comment\r\n"
    "\n"
    "   \t\n"
    "  # an indented comment\n"
    'request,service=svc,route=POST:/x,status_code=201 request_id="r",execution_time=0.5 3\r\n'
    "ints,t=1 n=3i,ok=t,big=1_000,neg=-.5,exp=1E+3 4\n"  # the exact parser's values
    'multi s="first\nsecond",f=1.5 5\n'  # a raw newline inside a string field
    "esc\\ aped,t=a\\,b f=1 6\n"
    "dup f=1,f=2 7\n"  # the last value of a key wins
    'unicode,t=\u00e9\u6f22 s="\u00fc\u00df\U0001f600" 8\n'
    "last f=2 9"  # no newline at the end
)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_reader_across_block_boundaries_equals_the_parser(step: int) -> None:
    text = LUNAMON_LINES + ODD_LINES
    points = read_points(text.encode(), step)
    assert points == parse_line_protocol(text)
    assert len(points) == 9
    assert points[3].fields == {"n": 3, "ok": True, "big": 1000.0, "neg": -0.5, "exp": 1000.0}
    assert points[4].fields["s"] == "first\nsecond"
    assert points[6].fields == {"f": 2.0}
    assert points[7].tags == {"t": "\u00e9\u6f22"}
    assert points[8].time_ns == 9


def test_reader_counts_lines_and_reads_in_blocks() -> None:
    data = (LUNAMON_LINES * 1000).encode()
    stream = Trickle(data, 1 << 30)
    reader = LineReader(stream)
    seen: list[int] = []
    reader.on_read = seen.append
    assert sum(1 for _ in reader) == 2000
    assert reader.lines == 2000
    assert sum(seen) == len(data)
    assert stream.reads == 2  # one block (the file is smaller) and the empty read at the end


def test_lunamon_lines_take_the_fast_path_the_others_the_exact_parser() -> None:
    records = list(LineReader(io.BytesIO((LUNAMON_LINES + ODD_LINES).encode())))
    fast = [type(r) is not Point for r in records]
    assert fast == [True, True, True, False, False, False, False, True, True]
    head, shape, _, floats, time_ns, line = records[0]
    assert head.series == "request"
    assert head.tags == {"service": "svc", "route": "POST:/x", "status_code": "201"}
    assert shape.keys == ("request_id", "execution_time", "save_time")
    assert floats == [0.25, 1e-05]
    assert time_ns == 1700000000000000001
    assert line == LUNAMON_LINES.splitlines()[0]
    # The lines of a head share its parsed tags.
    again = list(LineReader(io.BytesIO((LUNAMON_LINES * 2).encode())))
    assert again[0][0] is again[2][0]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("x f=1e999 1\n", "not finite"),  # overflows to inf: the exact parser's error
        ("x f=nan 1\n", "not finite"),
        ("x f=1e 1\n", "bad field value"),
        ("x f=1..2 1\n", "bad field value"),
        ("x f=1,g=2 1x\n", "bad timestamp"),
        ('x s="a",f=1 \n', "missing timestamp"),
    ],
)
def test_fast_lookalikes_fail_as_the_parser_says(line: str, why: str) -> None:
    text = LUNAMON_LINES + line
    with pytest.raises(LineProtocolError) as parsed:
        parse_line_protocol(text)
    with pytest.raises(LineProtocolError) as read:
        read_points(text.encode(), 5)
    assert str(read.value) == str(parsed.value)
    assert str(read.value).startswith("line 3: ")
    assert why in str(read.value)


def test_a_layout_seen_before_still_refuses_a_bad_value() -> None:
    good = "x,t=1 a=0.5,b=1.5 1\n"
    bad = "x,t=1 a=0.5,b=1e400 2\n"  # the same head and keys: the learnt regex matches
    with pytest.raises(LineProtocolError, match=r"^line 3: field value '1e400' is not finite"):
        read_points((good * 2 + bad).encode())


@pytest.mark.parametrize("step", [1, 4, 1 << 20])
def test_not_utf8_names_the_byte_across_blocks(step: int) -> None:
    data = b"ok f=1 1\n" * 3 + b"caf\xc3\xa9 f=1 2\nbad\xff f=1 3\n"
    with pytest.raises(NotTextError) as caught:
        read_points(data, step)
    offset = data.index(b"\xff")
    assert caught.value.offset == offset
    assert str(caught.value) == f"not UTF-8 text: byte {offset}"


def test_a_line_longer_than_a_block() -> None:
    long = "x " + ",".join(f"f{i}={i}.5" for i in range(30_000)) + " 1\n"
    assert len(long) > 1 << 18
    points = read_points((long * 3).encode(), 1 << 16)
    assert len(points) == 3
    assert points[2].fields["f29999"] == 29999.5


class Generated:
    """``count`` demo-shaped lines made as they are read: nothing on disk or in memory."""

    BLOCK = "".join(
        f"request,service=svc,route=POST:/r{k % 5},status_code=201"
        f' request_id="{k},{k:032x}",execution_time={(k % 997) / 1000 + 0.001!r},'
        f"a_time={(k % 13) / 10000!r},b_time={(k % 7) / 10000!r} {10**18 + k}\n"
        for k in range(1000)
    ).encode()

    def __init__(self, count: int) -> None:
        self.blocks = count // 1000
        self.rest = b""

    def read(self, size: int = -1) -> bytes:
        while len(self.rest) < size and self.blocks:
            self.rest += self.BLOCK
            self.blocks -= 1
        chunk, self.rest = self.rest[:size], self.rest[size:]
        return chunk


def test_200k_lines_are_read_in_constant_memory() -> None:
    """The records are made and dropped one by one: tracemalloc's peak stays at a few
    blocks (the old parser's list of points took hundreds of MB for as many lines)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in LineReader(Generated(200_000)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MB"


@settings(max_examples=150, deadline=None)
@given(ROWS, st.integers(min_value=1, max_value=40), st.booleans())
def test_property_reader_equals_parser(
    rows: list[tuple[str, int, dict, dict]],  # type: ignore[type-arg]
    step: int,
    crlf: bool,
) -> None:
    points = [Point(*row) for row in rows]
    text = encode_lines(points).decode()
    if crlf:  # every newline, those inside string fields too
        text = text.replace("\n", "\r\n")
    read = read_points(text.encode(), step)
    assert read == parse_line_protocol(text)
    assert read == points or crlf


def test_streaming_a_quote_in_a_field_key_before_a_string_with_a_newline() -> None:
    # Found by the property test above: the quick quote count took the key's quote for
    # a string's and cut the line at the newline inside the string.
    points = [
        Point("0", 0, {}, {'"': "\n"}),
        Point("m", 1, {}, {'a"b': "x\ny", "c": 1}),
        Point("m", 2, {}, {"k": 'a="b'}),
    ]
    text = encode_lines(points).decode()
    assert streamed(text) == parse_line_protocol(text) == points
