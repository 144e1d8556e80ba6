"""What InfluxDB can store: the checks and the one sanitising rule behind every point.

Keys are chosen by code, so a bad key is a programming error (``TypeError`` or
``ValueError`` at once). Values may come from requests, so a tag value InfluxDB
cannot store is sanitised by :func:`sanitize_tag_value` and a field value it
cannot parse is omitted; both are counted (:func:`omitted_counts`).
"""

from __future__ import annotations

import math
from typing import Final

TagValue = str | int | float
FieldValue = str | int | float | bool

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
MAX_KEY_BYTES: Final = 65535
RESERVED_KEYS: Final = frozenset({"time"})

# Why a value was left out of a point; read with `omitted_counts()`.
_omitted: dict[str, int] = {
    "field_nan_inf": 0,
    "field_int_range": 0,
    "field_none": 0,
    "tag_empty": 0,
    "tag_sanitized": 0,
}


def omitted_counts() -> dict[str, int]:
    """How many field values were omitted and tag values sanitised, by reason, in this process."""
    return dict(_omitted)


# --------------------------------------------------------------------------- validation


def validate_key(key: object, what: str = "key") -> str:
    """Return ``key`` if InfluxDB can store it as a tag or field key, else raise.

    Keys are chosen by code, not by users, so a bad one is a programming error:
    ``TypeError`` for a non-string, ``ValueError`` for an empty key, the reserved
    key ``time``, a CR or LF, a key over 64 KB, a key ending in a backslash, or an
    odd run of backslashes before ``,``, ``=`` or a space (see :func:`sanitize_tag_value`).
    """
    if type(key) is not str:
        if not isinstance(key, str):
            raise TypeError(f"{what} must be a str, not {type(key).__name__}: {key!r}")
        key = str(key)
    if not key:
        raise ValueError(f"{what} must not be empty")
    if key[0] == "\t":
        raise ValueError(f"{what} {key!r} starts with a tab, which InfluxDB 1.x strips")
    if key in RESERVED_KEYS:
        raise ValueError(f"{what} {key!r} is reserved by InfluxDB")
    if "\n" in key or "\r" in key:
        raise ValueError(f"{what} {key!r} contains a newline or carriage return")
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    if key.endswith("\\") or ("\\" in key and _fix_backslash_runs(key, ",= ") != key):
        raise ValueError(
            f"{what} {key!r} has a backslash before a separator or at its end,"
            " which InfluxDB cannot store"
        )
    return key


def validate_series(series: object) -> str:
    """Return ``series`` if it is a measurement name InfluxDB stores, else raise ``ValueError``."""
    name = validate_key(series, "series")
    if name.startswith("#"):
        raise ValueError(f"series {name!r} starts with '#': InfluxDB would read it as a comment")
    if "\\" in name and ("\\," in name or "\\ " in name or "\\=" in name):
        raise ValueError(
            f"series {name!r} has a backslash before ',', '=' or a space:"
            " InfluxDB 1.x would store it garbled"
        )
    return name


def sanitize_tag_value(value: TagValue) -> str:
    """The one rule for tag values InfluxDB 1.x could not store as given.

    - the value is converted with ``str()`` (tags are strings in InfluxDB);
    - CR and LF become a space (a newline would end the line: line injection);
    - an odd run of backslashes just before ``,``, ``=`` or a space gets one more
      backslash (1.x would otherwise read the last one as an escape of the
      separator and cut or corrupt the line);
    - backslashes at the end of the value are removed: InfluxDB 1.x rejects a tag
      value ending in a backslash, however many there are;
    - the result may be empty: the caller omits such a tag.

    Everything else, including backslashes elsewhere, is stored exactly.
    """
    text = value if type(value) is str else str(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    if "\\" in text:
        text = _fix_backslash_runs(text.rstrip("\\"), ",= ")
    return text


def _fix_backslash_runs(text: str, specials: str) -> str:
    out: list[str] = []
    run = 0
    for ch in text:
        if ch == "\\":
            run += 1
            continue
        if run:
            out.append("\\" * (run + (run % 2 if ch in specials else 0)))
            run = 0
        out.append(ch)
    if run:
        out.append("\\" * (run + run % 2))
    return "".join(out)


def validate_tag_value(value: object) -> str | None:
    """The stored form of a tag value, ``None`` when the tag is to be omitted.

    ``TypeError`` for a value that is not str, int or float (``None`` omits the tag).
    """
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise TypeError(f"tag value must be str, int or float, not {type(value).__name__}")
    text = sanitize_tag_value(value)
    if type(value) is str and text != value:
        _omitted["tag_sanitized"] += 1
    if not text:
        _omitted["tag_empty"] += 1
        return None
    return text


def validate_field_value(value: object) -> FieldValue | None:
    """The field value to store, ``None`` when it is to be omitted (and counted).

    bool is checked before int; ints outside int64, NaN and infinities are
    omitted (InfluxDB cannot parse them); ``None`` is omitted; any other type is
    a ``TypeError`` at the call that recorded it.
    """
    cls = type(value)
    if cls is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        _omitted["field_nan_inf"] += 1
        return None
    if cls is str or cls is bool:
        return value  # type: ignore[return-value]
    if cls is int:
        if INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        _omitted["field_int_range"] += 1
        return None
    if value is None:
        _omitted["field_none"] += 1
        return None
    # Subclasses of the allowed types (IntEnum, numpy scalars are not) are normalised.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return validate_field_value(int(value))
    if isinstance(value, float):
        return validate_field_value(float(value))
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"field value must be str, int, float or bool, not {cls.__name__}")
