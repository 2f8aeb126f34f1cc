"""The rehearsal's incremental agent-log reader: only appended bytes are parsed, a line counts
once its newline is written, and a log that starts over is read from its start."""
from __future__ import annotations

import json

from spotrun.harness.rehearsal_report import EventLog, read_events


def _line(event: str, **fields) -> str:
    return "<6>" + json.dumps({"event": event, **fields}) + "\n"


def test_it_reads_what_was_appended_and_holds_a_torn_line(tmp_path):
    path = tmp_path / "agent.log"
    reader = EventLog(path)
    assert reader.events() == []  # no log yet
    path.write_text(_line("a") + "a line that is not an event\n")
    assert [e["event"] for e in reader.events()] == ["a"]
    torn = _line("b", n=1)
    with open(path, "a") as log:
        log.write(torn[:10])
        log.flush()
        assert [e["event"] for e in reader.events()] == ["a"]
        log.write(torn[10:] + _line("c"))
    assert [e["event"] for e in reader.events()] == ["a", "b", "c"]
    assert reader.events()[1]["n"] == 1
    # The same as reading the whole log at once.
    assert reader.events() == read_events(path)


def test_a_log_that_starts_over_is_read_again(tmp_path):
    path = tmp_path / "agent.log"
    path.write_text(_line("old") + _line("old2"))
    reader = EventLog(path)
    assert len(reader.events()) == 2
    path.write_text(_line("new"))
    assert [e["event"] for e in reader.events()] == ["new"]
