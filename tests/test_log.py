"""lunamon's own log goes where the application says: the stdlib ``lunamon`` logger
unless the application configured structlog; and its text never shows a secret."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="%(levelname)s %(message)s")
    logging.getLogger("lunamon").setLevel(logging.{level})
    import lunamon
    from lunamon._log import logger
    lunamon.InfluxDBSink(username="u", password="pw-S3cr3t-77")  # a secret lunamon now knows
    logger.debug("debug_event", detail="quiet")
    logger.warning("warning_event", error="server said pw-S3cr3t-77")
    lunamon.MonitoringSettings.from_env({{"LUNAMON_FLUSH_INTERVALL": "9"}})
    """
)


def _run(level: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(level=level)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout + done.stderr


def test_the_application_sets_lunamon_level() -> None:
    quiet = _run("ERROR")
    assert "debug_event" not in quiet
    assert "warning_event" not in quiet
    loud = _run("DEBUG")
    assert "DEBUG debug_event detail='quiet'" in loud
    assert "WARNING warning_event error='server said ***'" in loud  # redacted
    assert "pw-S3cr3t-77" not in loud
    assert "unknown_environment_variable variable='LUNAMON_FLUSH_INTERVALL'" in loud
    assert "did you mean LUNAMON_FLUSH_INTERVAL?" in loud


def test_nothing_prints_without_logging_configured() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from lunamon._log import logger; logger.debug('quiet_event')"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == ""
    assert done.stderr == ""


def test_lunamon_testing_needs_no_pytest() -> None:
    code = "import sys, lunamon.testing; assert 'pytest' not in sys.modules, 'pytest imported'"
    subprocess.run([sys.executable, "-c", code], timeout=60, check=True)
