import io
import json

import pytest

from spotrun import log


@pytest.fixture(autouse=True)
def _default_logging_afterwards():
    yield
    log.configure()  # later tests capture stdout; leave no StringIO configured


def _lines(stream):
    return [line for line in stream.getvalue().splitlines() if line]


def test_each_event_is_one_prefixed_json_line():
    out = io.StringIO()
    log.configure(stream=out, job="j1")
    logger = log.get_logger("unit")
    logger.info("phase_changed", phase="training")
    logger.warning("interruption_notice", action="terminate")
    logger.error("agent_failed", error="boom")
    lines = _lines(out)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]
    assert events[0]["event"] == "phase_changed" and events[0]["job"] == "j1"
    assert events[0]["component"] == "unit" and events[0]["phase"] == "training"
    assert all("ts" in e and "level" in e for e in events)


def test_secrets_are_never_written():
    out = io.StringIO()
    log.configure(stream=out)
    logger = log.get_logger()
    logger.info("x", token="AQAEAabc-imds-token", aws_secret_access_key="s3cr3t",
                note="key AKIAABCDEFGHIJKLMNOP in text", password="hunter2")
    text = out.getvalue()
    for secret in ("AQAEAabc-imds-token", "s3cr3t", "AKIAABCDEFGHIJKLMNOP", "hunter2"):
        assert secret not in text
    assert text.count(log.REDACTED) == 4


def test_debug_is_filtered_at_info():
    out = io.StringIO()
    log.configure(level="info", stream=out)
    log.get_logger().debug("noise")
    assert _lines(out) == []


def test_a_logger_made_before_configure_follows_it():
    early = log.get_logger("early")
    out = io.StringIO()
    log.configure(stream=out)
    early.info("late_event")
    assert '"event":"late_event"' in out.getvalue() and '"component":"early"' in out.getvalue()
