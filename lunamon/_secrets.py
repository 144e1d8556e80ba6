"""Secrets: how lunamon recognises, holds, masks and redacts them (one module for all).

- an option whose *name* contains ``password``, ``token``, ``secret``, ... holds a
  secret (:func:`is_secret_key`), and so does the password of a URL
  (``scheme://user:password@host``) or a ``?token=...`` query parameter;
- a sink keeps a secret in a :class:`Secret`, which shows as ``'***'``;
- :func:`mask_secrets` gives a copy of options safe to show, :class:`SinkOptions`
  a mapping whose ``repr`` is masked;
- :func:`redact` replaces secret values inside a text (a server's answer, an
  exception message) with ``***``; :func:`secret_values` finds them in options.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final
from urllib.parse import unquote

MASK: Final = "***"
# Shorter secrets are not redacted: they would match everywhere and turn every
# message into noise without hiding anything.
_MIN_REDACTED: Final = 4
_SECRET_WORDS: Final = ("password", "passwd", "token", "secret", "authorization", "api_key")
# `scheme://user:password@host`, and `?token=...` style query parameters.
_URL_USERINFO: Final = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*:)(?P<pw>[^/@\s]+)@"
)
_URL_QUERY_SECRET: Final = re.compile(r"(?P<head>[?&](?P<key>[^=&#\s]+)=)(?P<value>[^&#\s]*)")


# Every secret value lunamon was given: its log lines and errors are redacted with them.
_known: set[str] = set()


def remember(values: Iterable[str]) -> None:
    """Redact these values from every log line and error lunamon emits from now on."""
    _known.update(value for value in values if value and len(value) >= _MIN_REDACTED)


def redact_known(text: str) -> str:
    """``text`` with every secret lunamon knows replaced by ``***``."""
    return redact(text, _known) if _known else text


class Secret:
    """A password or token that shows as ``'***'`` in ``repr``, ``str`` and ``vars()`` dumps.

    Its value is remembered: lunamon's log lines and errors never show it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        remember((value,))

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def is_secret_key(key: object) -> bool:
    """Whether an option named ``key`` holds a secret (its value is never shown)."""
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def mask_secrets(options: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``options`` safe to show: secret values and URL passwords become ``***``."""
    return {key: _mask_value(key, value) for key, value in options.items()}


def _mask_value(key: object, value: Any) -> Any:
    if value is None:
        return None
    if is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, Mapping):
        return mask_secrets(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_mask_value(None, item) for item in value)
    return value


def _mask_url(text: str) -> str:
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: m["head"] + MASK + "@", text)
    if "=" in text:
        text = _URL_QUERY_SECRET.sub(
            lambda m: m["head"] + MASK if is_secret_key(m["key"]) else m[0], text
        )
    return text


def secret_values(options: Mapping[Any, Any]) -> set[str]:
    """Every secret value held in ``options`` (nested tables and URLs included)."""
    return {s for s in _secret_values(None, options) if s}


def _secret_values(key: object, value: Any, secret: bool = False) -> Iterator[str]:
    secret = secret or is_secret_key(key)
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, Secret):
        yield value.reveal()
    elif isinstance(value, Mapping):
        for sub_key, sub_value in value.items():
            yield from _secret_values(sub_key, sub_value, secret)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _secret_values(None, item, secret)
    elif secret:
        yield str(value)
    elif isinstance(value, str):
        found = [m["pw"] for m in _URL_USERINFO.finditer(value)]
        found += [m["value"] for m in _URL_QUERY_SECRET.finditer(value) if is_secret_key(m["key"])]
        for text in found:
            yield text
            yield unquote(text)  # as the sink may show it, decoded


def redact(text: str, secrets: Iterable[str | Secret | None]) -> str:
    """``text`` with every secret (of at least 4 characters) replaced by ``***``."""
    values = (s.reveal() if isinstance(s, Secret) else s for s in secrets)
    # Longest first: a secret that contains another is hidden whole.
    for value in sorted(
        {v for v in values if v and len(v) >= _MIN_REDACTED}, key=len, reverse=True
    ):
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_secrets(text: str, options: Mapping[Any, Any]) -> str:
    """``text`` with every secret value of ``options`` replaced by ``***``."""
    return redact(text, secret_values(options))


class SinkOptions(Mapping[str, Any]):
    """A read-only mapping of sink options whose ``repr`` masks secrets (remembered)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)
        remember(secret_values(self._data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(mask_secrets(self._data))
