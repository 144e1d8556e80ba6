"""Reading InfluxDB 1.x line protocol back into points (files, the report, tests).

The inverse of :mod:`lunamon.point`'s encoder: a newline inside a quoted string
field does not end a line, blank lines and ``#`` comments are skipped, and a
malformed line raises :class:`~lunamon.errors.LineProtocolError` naming its number.

:class:`LineReader` reads a file in binary blocks, in constant memory: the lines
lunamon writes (no backslash, string and float fields, a timestamp) are matched
by one regular expression per field layout, learnt from the first line of the
layout, and their tags parsed once per distinct series-and-tags prefix; every
other line goes to the exact parser, so the points and the errors are the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import Final, Protocol

from lunamon.errors import LineProtocolError, NotTextError
from lunamon.point import FieldValue, Point, TagSet

__all__ = [
    "BinaryReadable",
    "FastLine",
    "Head",
    "LineProtocolError",
    "LineReader",
    "NotTextError",
    "Record",
    "Shape",
    "iter_line_protocol",
    "parse_line",
    "parse_line_protocol",
    "to_point",
]


def _split_logical_lines(text: str) -> Iterator[tuple[int, str]]:
    # A newline inside a quoted string field does not end the line.
    start = 0
    lineno = 1
    start_lineno = 1
    in_quotes = False
    in_fields = False
    spaces = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] != "\n":
            i += 2
            continue
        if ch == '"' and in_fields and (in_quotes or (i > 0 and text[i - 1] == "=")):
            # A string field value opens right after `=` and ends at the next bare quote.
            in_quotes = not in_quotes
        elif ch == " " and not in_quotes:
            spaces += 1
            in_fields = spaces == 1
        elif ch == "\n":
            lineno += 1
            if not in_quotes:
                yield start_lineno, text[start:i]
                start = i + 1
                start_lineno = lineno
                spaces = 0
                in_fields = False
        i += 1
    if start < n:
        yield start_lineno, text[start:]


def _scan(text: str, pos: int, stops: str) -> tuple[str, int]:
    """Read up to the first unescaped character of ``stops``; return the raw token and its end."""
    i = pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch in stops:
            break
        i += 1
    return text[pos:i], min(i, n)


def _unescape(token: str, chars: str) -> str:
    if "\\" not in token:
        return token
    for ch in chars:
        token = token.replace("\\" + ch, ch)
    return token


def _parse_field_value(raw: str, lineno: int) -> FieldValue:
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise LineProtocolError(f"line {lineno}: unterminated string field")
        body = raw[1:-1]
        out: list[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch == "\\" and i + 1 < len(body) and body[i + 1] in '"\\':
                out.append(body[i + 1])
                i += 2
                continue
            out.append(ch)
            i += 1
        return "".join(out)
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    if raw.endswith("i") or raw.endswith("u"):
        try:
            return int(raw[:-1])
        except ValueError:
            raise LineProtocolError(f"line {lineno}: bad integer {raw!r}") from None
    try:
        number = float(raw)
    except ValueError:
        raise LineProtocolError(f"line {lineno}: bad field value {raw!r}") from None
    if not math.isfinite(number):
        raise LineProtocolError(f"line {lineno}: field value {raw!r} is not finite")
    return number


def _scan_field_value(text: str, pos: int) -> tuple[str, int]:
    if pos < len(text) and text[pos] == '"':
        i = pos + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return text[pos : i + 1], i + 1
            i += 1
        return text[pos:], len(text)
    return _scan(text, pos, ", ")


def parse_line(line: str, lineno: int = 1) -> Point:
    """Parse one logical line of InfluxDB 1.x line protocol (with a timestamp in ns)."""
    raw_series, pos = _scan(line, 0, ", ")
    series = _unescape(raw_series, ", ")
    if not series:
        raise LineProtocolError(f"line {lineno}: missing measurement")
    tags: dict[str, str] = {}
    while pos < len(line) and line[pos] == ",":
        raw, pos = _scan(line, pos + 1, ", ")
        key_raw, eq = _scan(raw, 0, "=")
        if eq >= len(raw):
            raise LineProtocolError(f"line {lineno}: tag without '=': {raw[:80]!r}")
        tags[_unescape(key_raw, ",= ")] = _unescape(raw[eq + 1 :], ",= ")
    if pos >= len(line) or line[pos] != " ":
        raise LineProtocolError(f"line {lineno}: missing fields")
    pos += 1
    fields: dict[str, FieldValue] = {}
    while True:
        key_raw, pos = _scan(line, pos, "= ,")
        if pos >= len(line) or line[pos] != "=":
            raise LineProtocolError(f"line {lineno}: field without '=': {key_raw[:80]!r}")
        value_raw, pos = _scan_field_value(line, pos + 1)
        fields[_unescape(key_raw, ",= ")] = _parse_field_value(value_raw, lineno)
        if pos < len(line) and line[pos] == ",":
            pos += 1
            continue
        break
    rest = line[pos:].strip()
    if not rest:
        raise LineProtocolError(f"line {lineno}: missing timestamp")
    try:
        time_ns = int(rest)
    except ValueError:
        raise LineProtocolError(f"line {lineno}: bad timestamp {rest[:40]!r}") from None
    return Point.trusted(series, time_ns, tags, fields)


def _skipped(line: str) -> bool:
    """A blank line or a ``#`` comment, as InfluxDB sees them (spaces and tabs only)."""
    stripped = line.lstrip(" \t")
    return not stripped.rstrip("\r") or stripped[0] == "#"


def parse_line_protocol(text: str) -> list[Point]:
    """Parse a line-protocol document; blank lines and ``#`` comments are skipped."""
    points = []
    for lineno, line in _split_logical_lines(text):
        if _skipped(line):
            continue
        points.append(parse_line(line.rstrip("\r"), lineno))
    return points


# --------------------------------------------------------------------------- streaming

# One field of a line without backslashes: key=value, the value a quoted string
# (which may hold commas and spaces) or a bare token.
_FIELD: Final = re.compile(r'([^,="]+)=("[^"]*"|[^,"]+)')
_FIELDS: Final = re.compile(r'[^,="]+=(?:"[^"]*"|[^,"]+)(?:,[^,="]+=(?:"[^"]*"|[^,"]+))*')


def iter_line_protocol(lines: Iterable[str], start: int = 1) -> Iterator[Point]:
    """Points from physical lines (a text file object), parsed as they come: constant memory.

    The same grammar as :func:`parse_line_protocol`: a string field may hold a raw
    newline (its line goes on in the next one), blank lines and ``#`` comments are
    skipped. The lines lunamon writes take the fast path of :class:`LineReader`;
    the others, and anything the fast path doubts, the exact parser.
    """
    batches = ([line[:-1] if line.endswith("\n") else line] for line in lines)
    for record in _records(batches, start, _Caches()):
        yield to_point(record)


class Head:
    """A series-and-tags prefix (the line up to its first space) and its parsed parts,
    shared by every line that starts with it, with the field layouts seen after it."""

    __slots__ = ("misses", "series", "shapes", "tags", "text")

    def __init__(self, text: str, series: str, tags: TagSet) -> None:
        self.text = text
        self.series = series
        self.tags = tags  # shared by the points of this head: never mutate it
        self.shapes: list[Shape] = []
        self.misses = 0  # lines whose layout could not be learnt


class Shape:
    """One layout of fields: their keys in order, which are strings and which floats,
    and the regular expression that matches the rest of a line of that layout
    (fields and timestamp), one group per value and one for the timestamp."""

    __slots__ = ("float_at", "float_keys", "floats", "keys", "match", "strings", "strings_first")

    def __init__(self, keys: tuple[str, ...], kinds: tuple[bool, ...]) -> None:
        self.keys = keys  # every field key, in line order
        parts = [
            re.escape(key) + "=" + (_STRING if text else _BARE)
            for key, text in zip(keys, kinds, strict=True)
        ]
        self.match: Callable[[str], re.Match[str] | None] = re.compile(
            ",".join(parts) + r" (-?\d+)"
        ).fullmatch
        self.float_at = float_at = tuple(i for i, text in enumerate(kinds) if not text)
        self.float_keys = tuple(keys[i] for i in float_at)
        self.floats: Callable[[tuple[str, ...]], tuple[str, ...]] = _getter(float_at)
        self.strings: Callable[[tuple[str, ...]], tuple[str, ...]] = _getter(
            tuple(i for i, text in enumerate(kinds) if text)
        )
        self.strings_first = all(kinds[: len(kinds) - len(float_at)])

    def fields(self, groups: tuple[str, ...], floats: list[float]) -> dict[str, FieldValue]:
        """The fields of a matched line, in line order."""
        if self.strings_first:
            return dict(zip(self.keys, [*self.strings(groups), *floats], strict=True))
        values: list[FieldValue] = list(groups[:-1])
        for index, value in zip(self.float_at, floats, strict=True):
            values[index] = value
        return dict(zip(self.keys, values, strict=True))


def _getter(indexes: tuple[int, ...]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    if not indexes:
        return lambda groups: ()
    if len(indexes) == 1:
        (only,) = indexes
        return lambda groups: (groups[only],)
    return itemgetter(*indexes)


# A line of the fast path: its head, its layout, the layout's regex groups (the
# values as text, then the timestamp), the float values, the time and the line itself.
FastLine = tuple[Head, Shape, tuple[str, ...], list[float], int, str]
# What :class:`LineReader` yields: a fast line, or a point of the exact parser.
Record = FastLine | Point

_BLOCK: Final = 1 << 20  # bytes read at a time
_HEADS_LIMIT: Final = 65_536  # distinct heads remembered (the cache is cleared beyond)
_SHAPES_PER_HEAD: Final = 16  # layouts learnt per head; beyond, lines take the exact path
_MAX_FIELDS: Final = 256  # a layout of more fields is not worth its regex
# A bare value of a float's ASCII characters: float() decides (integers, booleans, nan,
# inf, "1_000" go to the exact parser), so a line of the fast path is one InfluxDB reads
# as lunamon does, and ``lunamon send`` forwards it as it is.
_BARE: Final = r"(-?[0-9.][0-9.eE+-]*)"
_STRING: Final = r'"([^"\\\n]*)"'
_KEY: Final = r'[^,="\s\\]+'
_PAIRS: Final = re.compile(rf'({_KEY})=("[^"\\\n]*"|[^,"\s\\]+)(?:,|(?= -?\d+$))')
_NO_HEAD: Final = Head("", "", TagSet())  # a head the fast path leaves to the exact parser


class _Caches:
    """Heads and layouts learnt while reading one input."""

    __slots__ = ("heads", "shapes")

    def __init__(self) -> None:
        self.heads: dict[str, Head] = {}
        self.shapes: dict[tuple[tuple[str, ...], tuple[bool, ...]], Shape] = {}

    def head(self, text: str) -> Head:
        if len(self.heads) >= _HEADS_LIMIT:
            self.heads.clear()
        head = self.heads[text] = _learn_head(text)
        return head

    def shape(self, head: Head, rest: str) -> Shape | None:
        """The layout of ``rest`` (fields and timestamp), remembered for ``head``."""
        if len(head.shapes) + head.misses >= _SHAPES_PER_HEAD:
            return None
        pairs = _PAIRS.findall(rest)
        keys = tuple(key for key, _ in pairs)
        kinds = tuple(value[:1] == '"' for _, value in pairs)
        # Duplicate keys (the exact parser keeps the last one) or a bare value that is
        # no float (an integer, a boolean): the exact parser's.
        if (
            not keys
            or len(keys) > _MAX_FIELDS
            or len(set(keys)) != len(keys)
            or not all(map(_is_float, pairs))
        ):
            head.misses += 1
            return None
        shape = self.shapes.get((keys, kinds))
        if shape is None:
            if len(self.shapes) >= _HEADS_LIMIT:
                self.shapes.clear()
            shape = self.shapes[(keys, kinds)] = Shape(keys, kinds)
        if shape.match(rest) is None:
            head.misses += 1
            return None
        head.shapes.append(shape)
        return shape


def _is_float(pair: tuple[str, str]) -> bool:
    value = pair[1]
    if value[:1] == '"':
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def _learn_head(text: str) -> Head:
    if "\\" in text or '"' in text:
        return _NO_HEAD
    series, *pairs = text.split(",")
    if not series:
        return _NO_HEAD
    tags = TagSet()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return _NO_HEAD
        tags[key] = value
    return Head(text, series, tags)


def to_point(record: Record) -> Point:
    """The point of a record of :class:`LineReader`."""
    if type(record) is Point:
        return record
    head, shape, groups, floats, time_ns, _ = record
    return Point.trusted(head.series, time_ns, head.tags, shape.fields(groups, floats))


def _records(batches: Iterable[list[str]], start: int, caches: _Caches) -> Iterator[Record]:
    """Records from batches of physical lines (without their newline), numbered from ``start``."""
    heads = caches.heads
    learn_head = caches.head
    learn_shape = caches.shape
    no_head = _NO_HEAD
    pending: list[str] = []
    pending_no = 0
    lineno = start - 1
    for lines in batches:
        for raw in lines:
            lineno += 1
            if pending:
                pending.append(raw + "\n")
                text = "".join(pending)
                if _inside_string(text):
                    continue
                pending = []
                yield from _parse_chunk(text, pending_no)
                continue
            line = raw.rstrip("\r") if raw[-1:] == "\r" else raw
            if line[:1] in " \t#":  # also "": a blank line
                if _skipped(line):
                    continue
            else:
                text, _, rest = line.partition(" ")
                head = heads.get(text)
                if head is None:
                    head = learn_head(text)
                if head is not no_head:
                    for shape in head.shapes:
                        match = shape.match(rest)
                        if match is not None:
                            break
                    else:
                        learnt = learn_shape(head, rest)
                        if learnt is None:
                            match = None
                        else:
                            shape = learnt
                            match = shape.match(rest)
                    if match is not None:
                        groups = match.groups()
                        try:
                            floats = list(map(float, shape.floats(groups)))
                        except ValueError:  # "t", "3i": the exact parser's
                            floats = [math.nan]
                        total = sum(floats)
                        if total - total == 0.0:  # nan or inf (or an overflow): exact path
                            yield (head, shape, groups, floats, int(groups[-1]), line)
                            continue
            if '"' in line and _open(line, raw):
                pending, pending_no = [raw + "\n"], lineno
                continue
            point = _parse_fast(line) if "\\" not in line else None
            yield point if point is not None else parse_line(line, lineno)
    if pending:
        yield from _parse_chunk("".join(pending), pending_no)


class BinaryReadable(Protocol):
    """What :class:`LineReader` reads from: a file opened in binary mode, or alike."""

    def read(self, size: int, /) -> bytes: ...


class LineReader:
    """Records (:data:`Record`) of a binary line-protocol stream, read in blocks.

    ``on_read`` gets the size of each block read (a progress bar); ``lines`` counts
    the physical lines seen so far. A stream that is not UTF-8 raises
    :class:`NotTextError`, a malformed line :class:`LineProtocolError` with its number.
    """

    def __init__(
        self, stream: BinaryReadable, *, on_read: Callable[[int], None] | None = None
    ) -> None:
        self.stream = stream
        self.on_read = on_read
        self.lines = 0

    def __iter__(self) -> Iterator[Record]:
        return _records(self._batches(), 1, _Caches())

    def points(self) -> Iterator[Point]:
        """The records as points."""
        for record in self:
            yield to_point(record)

    def _batches(self) -> Iterator[list[str]]:
        read = self.stream.read
        parts: list[bytes] = []
        offset = 0  # bytes decoded so far
        while True:
            block = read(_BLOCK)
            if not block:
                break
            if self.on_read is not None:
                self.on_read(len(block))
            cut = block.rfind(b"\n")
            if cut < 0:
                parts.append(block)
                continue
            data = b"".join([*parts, block[:cut]]) if parts else block[:cut]
            parts = [block[cut + 1 :]] if cut + 1 < len(block) else []
            lines = self._decode(data, offset).split("\n")
            offset += len(data) + 1
            self.lines += len(lines)
            yield lines
        if parts:
            last = self._decode(b"".join(parts), offset)
            self.lines += 1
            yield [last]

    @staticmethod
    def _decode(data: bytes, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotTextError(offset + exc.start) from None


def _open(line: str, physical: str) -> bool:
    """Whether ``line`` ends inside a string field (its value goes on in the next line)."""
    # Without backslashes, a quote opens a string (after "=") or closes one (before a
    # comma, a space or the end); when every quote is one of those, their count says
    # whether a string is left open. A quote anywhere else (a key's, the series' or a
    # tag's) takes the exact scan.
    if "\\" in line or '"' in line.partition(" ")[0] or _odd_quote(line):
        return _inside_string(physical)
    return line.count('"') % 2 == 1


# A quote that neither opens a string field nor closes one.
_odd_quote: Final = re.compile(r'(?<!=)"(?![ ,]|$)').search


def _inside_string(text: str) -> bool:
    """Whether ``text`` ends inside a string field (the scan of :func:`_split_logical_lines`)."""
    in_quotes = in_fields = False
    spaces = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] != "\n":
            i += 2
            continue
        if ch == '"' and in_fields and (in_quotes or (i > 0 and text[i - 1] == "=")):
            in_quotes = not in_quotes
        elif ch == " " and not in_quotes:
            spaces += 1
            in_fields = spaces == 1
        elif ch == "\n" and not in_quotes:
            spaces, in_fields = 0, False
        i += 1
    return in_quotes


def _parse_chunk(text: str, first_lineno: int) -> Iterator[Point]:
    for lineno, line in _split_logical_lines(text):
        if not _skipped(line):
            yield parse_line(line.rstrip("\r"), first_lineno + lineno - 1)


_BOOLS: Final = {
    "t": True, "T": True, "true": True, "True": True, "TRUE": True,
    "f": False, "F": False, "false": False, "False": False, "FALSE": False,
}  # fmt: skip
_INFINITE: Final = (math.inf, -math.inf)


def _parse_fast(line: str) -> Point | None:
    """A line without backslashes, or ``None`` to leave it to the exact parser."""
    head, _, rest = line.partition(" ")
    fields_text, _, stamp = rest.rpartition(" ")
    if not fields_text or not (stamp.isdigit() or (stamp[:1] == "-" and stamp[1:].isdigit())):
        return None
    if not _FIELDS.fullmatch(fields_text):
        return None
    series, *pairs = head.split(",")
    if not series:
        return None
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return None
        tags[key] = value
    fields: dict[str, FieldValue] = {}
    for key, raw in _FIELD.findall(fields_text):
        first = raw[:1]
        if first == '"':
            fields[key] = raw[1:-1]
        elif raw[-1:] == "i":
            try:
                fields[key] = int(raw[:-1])
            except ValueError:
                return None
        elif first in "tTfF" and first:
            flag = _BOOLS.get(raw)
            if flag is None:
                return None
            fields[key] = flag
        else:
            try:
                number = float(raw)
            except ValueError:
                return None
            if number != number or number in _INFINITE:
                return None
            fields[key] = number
    return Point.trusted(series, int(stamp), tags, fields)
