"""The request-scoped collector and add_tag / add_field."""

from __future__ import annotations

import math

import pytest

from lunamon import RequestCollector, add_field, add_tag, current_request
from lunamon.collector import current


def test_outside_a_request_everything_is_a_no_op() -> None:
    assert current_request() is None
    add_tag("k", "v")
    add_field("k", 1.0)


def test_add_tag_and_field_validate_at_record_time() -> None:
    c = RequestCollector("GET:/x", "rid")
    token = current.set(c)
    try:
        assert current_request() is c
        add_tag("customer", "acme corp")
        add_tag("line", "a\nb")
        add_tag("empty", "")
        add_field("items", 3)
        add_field("nan", math.nan)
        with pytest.raises(TypeError, match="field value"):
            add_field("obj", object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reserved"):
            add_tag("time", "x")
        with pytest.raises(TypeError):
            add_tag(1, "x")  # type: ignore[arg-type]
    finally:
        current.reset(token)
    assert c.extra_tags == {"customer": "acme corp", "line": "a b"}
    assert c.extra_fields == {"items": 3}
    assert "GET:/x" in repr(c)
