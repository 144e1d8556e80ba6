"""The fault campaign (issue 18, RELIABILITY.md items 35-41): a seeded random sequence of
single faults against real influxd, clickhouse-server and a 3-worker gunicorn service
scraped by a real prometheus, under steady traffic; then an exact reconciliation of every
store against the ``Luna-Request-Id`` of every answer the client received.

``python -m tests.campaign --seed N --steps K --duration S`` (``make faults``) runs one
campaign and exits non-zero when a store is not exact; tests/test_campaign.py runs a
short slice. The modules, one idea each:

- :mod:`.stack`: the servers and the gunicorn service of one run;
- :mod:`.traffic`: the client, which records each answer's id, status and worker;
- :mod:`.faults`: the catalogue of faults and the seeded plan;
- :mod:`.reconcile`: what each store holds against what the client got, as a table;
- :mod:`.run`: one campaign, start to table.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:  # `python -m tests.campaign`: servers.py is imported as in tests
    sys.path.insert(0, _TESTS)

from .run import CampaignResult, run_campaign  # noqa: E402

__all__ = ["CampaignResult", "run_campaign"]
