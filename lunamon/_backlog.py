"""Points waiting behind a slow or dead sink, kept compact.

A point as the recorder makes it costs about 1,000 bytes for the seed schema: the
fields dict alone is ~650 (eleven keys need a 32-slot table), each float another 24.
While a sink is down, up to ``buffer_size`` of them wait. :class:`PackedPoints` holds
a run of them column-wise: times in an ``array('q')``, float fields in an
``array('d')``, other field values (the request id) by reference, and per point the
index of its *layout* (series, tags object, field keys, which are floats), shared by
the points of one route and status. About 200 bytes a seed point. Points come back
in order, equal to what went in (the same tags object, the same field order, floats
bit for bit); the flusher packs only what waits beyond a batch and more, so a sink
that keeps up never sees a packed point.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from typing import Final

from lunamon.point import FieldValue, Point

__all__ = ["PACK_RUN", "PackedPoints"]

# Points packed at a time (one pass stays well under a millisecond).
PACK_RUN: Final = 256
# The layout index of an item kept whole: anything but a plain Point (a subclass carrying
# more, like the line `lunamon send` forwards as read).
_WHOLE: Final = 0xFFFF

_Layout = tuple[str, Mapping[str, str], tuple[str, ...], tuple[bool, ...]]


class PackedPoints:
    """A run of points, oldest first, read back one at a time with :meth:`popleft`."""

    __slots__ = (
        "_floats",
        "_fpos",
        "_layout_of",
        "_layouts",
        "_next",
        "_opos",
        "_others",
        "_times",
    )

    def __init__(self, points: Sequence[Point]) -> None:
        layouts: list[_Layout] = []
        index: dict[tuple[str, int, tuple[str, ...], tuple[bool, ...]], int] = {}
        times = array("q")
        layout_of = array("H")
        floats = array("d")
        others: list[FieldValue] = []
        for point in points:
            if type(point) is not Point:
                times.append(0)
                layout_of.append(_WHOLE)
                others.append(point)  # type: ignore[arg-type]
                continue
            series, time_ns, tags, fields = point
            values = list(fields.values())
            kinds = tuple([type(value) is float for value in values])
            keys = tuple(fields)
            # id(tags) is safe as a key: the layout keeps the tags object alive.
            key = (series, id(tags), keys, kinds)
            number = index.get(key)
            if number is None:
                number = index[key] = len(layouts)
                layouts.append((series, tags, keys, kinds))
            times.append(time_ns)
            layout_of.append(number)
            for value, is_float in zip(values, kinds, strict=True):
                if is_float:
                    floats.append(value)
                else:
                    others.append(value)
        self._layouts = layouts
        self._times = times
        self._layout_of = layout_of
        self._floats = floats
        self._others = others
        self._next = self._fpos = self._opos = 0

    def __len__(self) -> int:
        """Points not yet taken."""
        return len(self._times) - self._next

    def popleft(self) -> Point:
        """The oldest point not yet taken, as it was packed."""
        i = self._next
        number = self._layout_of[i]
        if number == _WHOLE:
            self._next, self._opos = i + 1, self._opos + 1
            return self._others[self._opos - 1]  # type: ignore[return-value]
        series, tags, keys, kinds = self._layouts[number]
        fields: dict[str, FieldValue] = {}
        floats, others = self._floats, self._others
        fpos, opos = self._fpos, self._opos
        for key, is_float in zip(keys, kinds, strict=True):
            if is_float:
                fields[key] = floats[fpos]
                fpos += 1
            else:
                fields[key] = others[opos]
                opos += 1
        self._next, self._fpos, self._opos = i + 1, fpos, opos
        return Point.trusted(series, self._times[i], tags, fields)  # type: ignore[arg-type]

    def skip(self) -> None:
        """Drop the oldest point not yet taken, without building it."""
        i = self._next
        number = self._layout_of[i]
        if number == _WHOLE:
            self._next, self._opos = i + 1, self._opos + 1
            return
        kinds = self._layouts[number][3]
        floats = sum(kinds)
        self._next, self._fpos, self._opos = (
            i + 1,
            self._fpos + floats,
            self._opos + len(kinds) - floats,
        )
