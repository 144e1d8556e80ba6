"""The README's Python examples run, and do what the README says they do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import lunamon

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_starts_with_the_two_commands() -> None:
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[0] == "# lunamon"
    assert lines[2].startswith("make demo")
    assert lines[3].startswith("make test")


async def test_instrument_your_app_example_gives_the_promised_point() -> None:
    blocks = [b for b in python_blocks() if "lunamon.setup(" in b and "web.Application()" in b]
    assert blocks, "the README lost its 'Instrument your app' example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # our own README
    app: web.Application = namespace["app"]
    sink = next(s for s in app[lunamon.MONITORING_KEY].sinks if isinstance(s, lunamon.MemorySink))
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/detector", headers={"Luna-Account-Id": "acme"})
        assert response.status == 201
        await app[lunamon.MONITORING_KEY].flush()
    (point,) = sink.points
    line = point.to_line_protocol()
    assert line.startswith(
        "request,service=luna-handlers,route=POST:/detector,status_code=201,account_id=acme "
    )
    assert set(point.fields) == {"request_id", "execution_time", "save_warps_time"}


def test_every_python_block_compiles() -> None:
    for block in python_blocks():
        compile(block, "README.md", "exec")
