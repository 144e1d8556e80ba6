"""Reading InfluxDB 1.x line protocol back into points (files, the report, tests).

The inverse of :mod:`lunamon.point`'s encoder: a newline inside a quoted string
field does not end a line, blank lines and ``#`` comments are skipped, and a
malformed line raises :class:`~lunamon.errors.LineProtocolError` naming its number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Final

from lunamon.errors import LineProtocolError
from lunamon.point import FieldValue, Point

__all__ = ["LineProtocolError", "iter_line_protocol", "parse_line", "parse_line_protocol"]


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
    """Points from physical lines (a file object), parsed as they come: constant memory.

    The same grammar as :func:`parse_line_protocol`: a string field may hold a raw
    newline (its line goes on in the next one), blank lines and ``#`` comments are
    skipped. Lines without backslashes take a fast path (a regular expression);
    the others, and anything the fast path doubts, the exact parser.
    """
    pending: list[str] = []
    pending_no = 0
    for lineno, physical in enumerate(lines, start):
        if pending:
            pending.append(physical)
            text = "".join(pending)
            if _inside_string(text):
                continue
            pending = []
            yield from _parse_chunk(text, pending_no)
            continue
        line = physical.rstrip("\n").rstrip("\r")
        if _skipped(line):
            continue
        if '"' in line and _open(line, physical):
            pending, pending_no = [physical], lineno
            continue
        point = _parse_fast(line) if "\\" not in line else None
        yield point if point is not None else parse_line(line, lineno)
    if pending:
        yield from _parse_chunk("".join(pending), pending_no)


def _open(line: str, physical: str) -> bool:
    """Whether ``line`` ends inside a string field (its value goes on in the next line)."""
    if "\\" in line or '"' in line.partition(" ")[0]:
        return _inside_string(physical)
    return line.count('"') % 2 == 1  # quotes only open and close string fields here


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
