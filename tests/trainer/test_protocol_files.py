"""The protocol files: what a trainer writes to say hello and to say it finished, and what the
agent accepts as this trainer's (written at or after its start)."""
import json
import os
import time

from spotrun_trainer import protocol


def test_hello_and_completion_round_trip_with_freshness(tmp_path):
    hello, done = tmp_path / protocol.HELLO_FILE, tmp_path / protocol.COMPLETION_FILE
    started = time.time()
    protocol.write_hello(hello)
    protocol.write_completion(done, global_step=40)
    assert protocol.read_hello(hello, since=started)["handles"] == ["SIGTERM", "SIGUSR1"]
    assert protocol.read_completion(done, since=started)["global_step"] == 40
    # Written before this trainer started: an earlier trainer's, not this one's.
    later = time.time() + 5
    assert protocol.read_hello(hello, since=later) is None
    assert protocol.read_completion(done, since=later) is None


def test_a_withdrawn_or_foreign_or_torn_record_is_not_a_completion(tmp_path):
    done = tmp_path / protocol.COMPLETION_FILE
    protocol.write_completion(done, global_step=1)
    protocol.withdraw_completion(done)
    protocol.withdraw_completion(done)  # twice: nothing to withdraw is fine
    assert protocol.read_completion(done) is None
    done.write_text(json.dumps({"protocol": 99, "time": time.time()}))
    assert protocol.read_completion(done) is None
    done.write_text('{"protocol": 1, "time": ')
    assert protocol.read_completion(done) is None
    done.write_text(json.dumps({"protocol": 1, "time": "yesterday"}))
    assert protocol.read_completion(done) is None


def test_paths_come_from_the_agents_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(protocol.HELLO_ENV, raising=False)
    monkeypatch.delenv(protocol.COMPLETION_ENV, raising=False)
    assert protocol.hello_path() is None
    assert protocol.completion_path(tmp_path) == tmp_path / protocol.COMPLETION_FILE
    monkeypatch.setenv(protocol.HELLO_ENV, str(tmp_path / "h.json"))
    monkeypatch.setenv(protocol.COMPLETION_ENV, str(tmp_path / "c.json"))
    assert protocol.hello_path() == tmp_path / "h.json"
    assert protocol.completion_path("/elsewhere") == tmp_path / "c.json"


def test_no_temporary_is_left_behind(tmp_path):
    protocol.write_completion(tmp_path / "c.json", global_step=3)
    assert os.listdir(tmp_path) == ["c.json"]
