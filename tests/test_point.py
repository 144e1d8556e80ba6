"""Point validation, the line-protocol encoder, and its parser (1.x semantics)."""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunamon._validation import omitted_counts, sanitize_tag_value
from lunamon.lineprotocol import parse_line_protocol
from lunamon.point import Point, TagSet, encode_lines, encode_lines_async, pure_python_requested


def test_point_is_frozen_and_slotted() -> None:
    p = Point("request", 1, {"route": "POST:/x"}, {"execution_time": 0.5})
    with pytest.raises(AttributeError):
        p.series = "other"  # type: ignore[misc]
    assert not hasattr(p, "__dict__")
    assert (p.series, p.time_ns, dict(p.tags), dict(p.fields)) == (
        "request",
        1,
        {"route": "POST:/x"},
        {"execution_time": 0.5},
    )
    assert pickle.loads(pickle.dumps(p)) == p


def test_seed_point_line() -> None:
    p = Point(
        "request",
        1700000000123456789,
        {
            "service": "luna-handlers",
            "route": "POST:/handlers/{handlerId}/events",
            "status_code": 201,
        },
        {"request_id": "1700000000,abc", "execution_time": 0.25, "match_policy_time": 0.0},
    )
    assert p.to_line_protocol() == (
        "request,service=luna-handlers,route=POST:/handlers/{handlerId}/events,status_code=201 "
        'request_id="1700000000,abc",execution_time=0.25,match_policy_time=0.0 1700000000123456789'
    )


@pytest.mark.parametrize(
    ("value", "line_part"),
    [
        (True, "f=true"),
        (False, "f=false"),
        (3, "f=3i"),
        (-(2**63), f"f={-(2**63)}i"),
        (2**63 - 1, f"f={2**63 - 1}i"),
        (1.5, "f=1.5"),
        (1e-7, "f=1e-07"),
        ('say "hi" \\ there', 'f="say \\"hi\\" \\\\ there"'),
        ("two\nlines", 'f="two\nlines"'),
        ("a\\b", 'f="a\\\\b"'),  # a backslash without a quote is escaped too
        ("ends in \\", 'f="ends in \\\\"'),  # else it would escape the closing quote
        ("\\\\", 'f="\\\\\\\\"'),
    ],
)
def test_field_types(value: object, line_part: str) -> None:
    line = Point("s", 1, {}, {"f": value}).to_line_protocol()
    assert line == f"s {line_part} 1"
    assert parse_line_protocol(line)[0].fields["f"] == value
    assert type(parse_line_protocol(line)[0].fields["f"]) is type(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (math.nan, "field_nan_inf"),
        (math.inf, "field_nan_inf"),
        (-math.inf, "field_nan_inf"),
        (2**63, "field_int_range"),
        (-(2**63) - 1, "field_int_range"),
        (None, "field_none"),
    ],
)
def test_unrepresentable_fields_are_omitted_and_counted(value: object, reason: str) -> None:
    before = omitted_counts()[reason]
    p = Point("s", 1, {}, {"bad": value, "ok": 1.0})
    assert dict(p.fields) == {"ok": 1.0}
    assert omitted_counts()[reason] == before + 1


def test_point_without_fields_is_refused() -> None:
    with pytest.raises(ValueError, match="no storable field"):
        Point("s", 1, {}, {"bad": math.nan})
    with pytest.raises(ValueError, match="no storable field"):
        Point("s", 1, {"t": "v"}, {})


def test_unknown_types_are_type_errors() -> None:
    with pytest.raises(TypeError, match="field value"):
        Point("s", 1, {}, {"f": object()})
    with pytest.raises(TypeError, match="tag value"):
        Point("s", 1, {"t": [1]}, {"f": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="must be a str"):
        Point("s", 1, {}, {1: 1.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="time_ns"):
        Point("s", 1.5, {}, {"f": 1.0})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("series", "message"),
    [
        ("#comment", "comment"),
        ("", "empty"),
        ("a\nb", "newline"),
        ("trailing\\", "backslash"),
        ("time", "reserved"),
    ],
)
def test_bad_series_refused(series: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Point(series, 1, {}, {"f": 1.0})


@pytest.mark.parametrize("key", ["time", "", "a\rb", "x" * 70000, "k\\"])
def test_bad_keys_refused(key: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages, one per rule
        Point("s", 1, {key: "v"}, {"f": 1.0})
    with pytest.raises(ValueError):  # noqa: PT011
        Point("s", 1, {}, {key: 1.0})


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("plain", "plain"),
        ("a,b c=d", "a,b c=d"),
        ("back\\slash", "back\\slash"),
        ("double\\\\", "double"),
        ("trailing\\", "trailing"),
        ("mid\\dle\\", "mid\\dle"),
        ("odd\\ space", "odd\\\\ space"),
        ("odd\\,comma", "odd\\\\,comma"),
        ("new\nline", "new line"),
        ("cr\r\nlf", "cr lf"),
        ("\n", " "),
        ("ünï©ødé ✓", "ünï©ødé ✓"),
        (200, "200"),
        (1.5, "1.5"),
    ],
)
def test_tag_value_policy(raw: str | int, stored: str) -> None:
    assert sanitize_tag_value(raw) == stored
    line = Point("s", 1, {"t": raw}, {"f": 1.0}).to_line_protocol()
    assert "\n" not in line
    assert parse_line_protocol(line)[0].tags == {"t": stored}


def test_empty_tag_value_is_omitted_and_counted() -> None:
    before = omitted_counts()["tag_empty"]
    p = Point("s", 1, {"t": "", "u": "x"}, {"f": 1.0})
    assert dict(p.tags) == {"u": "x"}
    assert omitted_counts()["tag_empty"] == before + 1


def test_escaping_matrix_round_trips() -> None:
    specials = ["a,b", "a b", "a=b", 'a"b', "a\\b", "ü ✓", "x,y=z w"]
    for text in specials:
        p = Point(
            f"m{text}".replace("=", "_").replace('"', "_"),
            7,
            {f"k{text}": f"v{text}"},
            {f"f{text}": f"s{text}\nnext", "n": 1.0},
        )
        line = p.to_line_protocol()
        assert parse_line_protocol(line) == [p], line


def test_injection_attempt_stays_one_line() -> None:
    evil = "x\nevil v=1 1"
    line = Point("request", 5, {"route": evil}, {"f": 1.0}).to_line_protocol()
    assert "\n" not in line
    (back,) = parse_line_protocol(line)
    assert back.series == "request"
    assert back.tags["route"] == "x evil v=1 1"


def test_parse_skips_comments_and_blank_lines_and_reports_bad_lines() -> None:
    text = "# a comment\n\ns f=1.0 1\n"
    assert parse_line_protocol(text) == [Point("s", 1, {}, {"f": 1.0})]
    for bad in ["s f=1.0", "s 1", 's f="unterminated 1', "s f=abc 1", "s f=1.0 notatime"]:
        with pytest.raises(ValueError, match="line 1"):
            parse_line_protocol(bad)


async def test_encode_lines_async_equals_sync() -> None:
    points = [Point("s", i, {"t": str(i % 7)}, {"f": float(i)}) for i in range(1234)]
    assert await encode_lines_async(points, chunk=100) == encode_lines(points)
    assert encode_lines([]) == b""


# ---------------------------------------------------------------- property test

_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    min_size=1,
    max_size=20,
)
_key = _text.filter(
    lambda k: k != "time" and "\n" not in k and "\r" not in k and not k.startswith("\t")
).map(lambda k: k.replace("\\", "/"))
_series = _key.filter(lambda s: not s.startswith("#"))
_field_value = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)


@settings(max_examples=300, deadline=None)
@given(
    series=_series,
    time_ns=st.integers(min_value=-(2**62), max_value=2**62),
    tags=st.dictionaries(_key, st.one_of(_text, st.integers()), max_size=4),
    fields=st.dictionaries(_key, _field_value, min_size=1, max_size=4),
)
def test_property_one_line_per_point_and_parse_gives_it_back(
    series: str,
    time_ns: int,
    tags: dict[str, str | int],
    fields: dict[str, object],
) -> None:
    p = Point(series, time_ns, tags, fields)
    line = p.to_line_protocol()
    # Exactly one logical line: outside quoted string fields there is no newline.
    (back,) = parse_line_protocol(line + "\n")
    assert back == p
    assert back.tags == {k: sanitize_tag_value(v) for k, v in tags.items() if sanitize_tag_value(v)}


def test_shared_tagset_caches_its_prefix_per_series() -> None:
    from lunamon.point import TagSet

    tags = TagSet(route="POST:/a b", status_code="200")
    first = Point.trusted("request", 1, tags, {"f": 1.0})
    other = Point.trusted("error", 1, tags, {"f": 1.0})
    assert first.to_line_protocol() == "request,route=POST:/a\\ b,status_code=200 f=1.0 1"
    assert other.to_line_protocol() == "error,route=POST:/a\\ b,status_code=200 f=1.0 1"
    assert first.to_line_protocol() == "request,route=POST:/a\\ b,status_code=200 f=1.0 1"
    assert pickle.loads(pickle.dumps(first)) == first


# ---------------------------------------------------------------- the encoder's caches
# (architecture.md: the recorder's shared tags are escaped once per route, keys once.)


def test_shared_tagset_prefix_is_computed_once_then_read_back() -> None:
    from lunamon.point import TagSet

    tags = TagSet(route="POST:/a b")
    point = Point.trusted("request", 1, tags, {"f": 1.0})
    assert point.to_line_protocol() == "request,route=POST:/a\\ b f=1.0 1"
    assert tags._head == ("request", "request,route=POST:/a\\ b")
    tags._head = ("request", "cached-prefix")  # read from the cache, not escaped again
    assert point.to_line_protocol() == "cached-prefix f=1.0 1"
    assert Point.trusted("error", 2, tags, {"f": 1.0}).to_line_protocol() == (
        "error,route=POST:/a\\ b f=1.0 2"  # another series: not that prefix
    )
    assert tags._head == ("error", "error,route=POST:/a\\ b")


def test_series_tag_pairs_and_field_keys_are_escaped_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lunamon.point as point_module

    calls: list[str] = []

    def counting(name: str) -> None:
        original = getattr(point_module, name)

        def wrapper(*args: str) -> str:
            calls.append(name)
            return original(*args)  # type: ignore[no-any-return]

        monkeypatch.setattr(point_module, name, wrapper)

    for name in ("_escape_series", "_tag_pair", "_field_key"):
        counting(name)
    point_module._series_cache.clear()
    point_module._tag_cache.clear()
    point_module._field_key_cache.clear()
    points = [
        Point("odd series", i, {"k": "v w", "j": "x"}, {"f x": float(i), "g": i}) for i in range(5)
    ]
    lines = encode_lines(points).decode().splitlines()
    assert lines[3] == "odd\\ series,k=v\\ w,j=x f\\ x=3.0,g=3i 3"
    assert sorted(calls) == ["_escape_series", "_field_key", "_field_key", "_tag_pair", "_tag_pair"]


def test_the_encoder_caches_stay_within_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import lunamon.point as point_module

    monkeypatch.setattr(point_module, "_CACHE_LIMIT", 3)
    caches = (point_module._series_cache, point_module._tag_cache, point_module._field_key_cache)
    for cache in caches:
        cache.clear()
    for i in range(10):
        line = Point(f"s{i}", i, {f"k{i}": "v"}, {f"f{i}": 1.0}).to_line_protocol()
        assert line == f"s{i},k{i}=v f{i}=1.0 {i}"
        assert [len(cache) for cache in caches] == [i % 3 + 1] * 3


async def test_encode_lines_async_yields_between_chunks_of_100(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    points = [Point("s", i, {}, {"f": float(i)}) for i in range(250)]
    for count, chunks in [(1, 0), (100, 0), (101, 2), (250, 3)]:
        sleeps.clear()
        assert await encode_lines_async(points[:count]) == encode_lines(points[:count])
        assert sleeps == [0] * chunks, count  # a yield per chunk, never a delay


def test_point_repr_shows_its_parts() -> None:
    point = Point("m", 7, {"k": "v"}, {"f": 1.5, "s": "x"})
    assert (
        repr(point) == "Point(series='m', time_ns=7, tags={'k': 'v'}, fields={'f': 1.5, 's': 'x'})"
    )


def test_a_tagset_head_is_built_once_for_every_point_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import lunamon.point as point_module

    built: list[str] = []
    original = point_module._head

    def counting(series: str, tags: Mapping[str, str]) -> str:
        built.append(series)
        return original(series, tags)

    monkeypatch.setattr(point_module, "_head", counting)
    tags = TagSet(service="svc", route="GET:/x")
    points = [Point.trusted("request", i, tags, {"x": 1}) for i in range(5)]
    assert [p.to_line_protocol() for p in points][4] == "request,service=svc,route=GET:/x x=1i 4"
    encode_lines(points)
    assert built == ["request"]  # the TagSet keeps its head: made once, for the first point
    encode_lines([Point.trusted("error", 9, tags, {"x": 1})])
    assert built == ["request", "error"]  # another series: a head of its own


@pytest.mark.parametrize(
    ("value", "pure"),
    [
        ("1", True),
        ("true", True),
        ("yes", True),
        ("on", True),
        (" ON ", True),
        ("", False),
        ("0", False),
        ("no", False),
        ("off", False),
        (None, False),
    ],
)
def test_lunamon_pure_python_spellings(
    monkeypatch: pytest.MonkeyPatch, value: str | None, pure: bool
) -> None:
    """What switches the speedups off (the compiled encoder, orjson for ClickHouse)."""
    if value is None:
        monkeypatch.delenv("LUNAMON_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setenv("LUNAMON_PURE_PYTHON", value)
    assert pure_python_requested() is pure
