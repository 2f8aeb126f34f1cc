"""The trainer library's events: in the agent's process they join its structured log; in a
trainer under the agent they are ``<prio>{json}`` lines the journal stream turns into
priorities; elsewhere readable lines. Each in a fresh process: logging handlers are
process-wide and the agent's own configuration must not leak into the other cases."""
import io
import json
import os
import subprocess
import sys

from spotrun import log

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EMIT = ("from spotrun_trainer.logs import log_event; "
        "log_event('warning', 'checkpoint_corrupt', component='store', path='/x/ckpt-1', reason='sha256'); "
        "log_event('info', 'training_resumed', global_step=12)")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SPOTRUN_JOB_ID"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, cwd=REPO, timeout=60, check=True)


def test_under_the_agent_each_event_is_a_prefixed_json_line_on_stderr():
    # The shipped layout: the AMI's Python with only the packaged library on its path
    # (/usr/lib/spotrun/trainer-lib), no agent package, no structlog.
    code = ("import importlib.util, sys; "
            "assert importlib.util.find_spec('spotrun') is None, 'the agent package is importable'; "
            + EMIT)
    result = subprocess.run(["/usr/bin/python3", "-s", "-c", code], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "SPOTRUN_JOB_ID": "job-1",
                                 "PYTHONPATH": os.path.join(REPO, "trainer")},
                            cwd="/", timeout=60, check=True)
    lines = [line for line in result.stderr.splitlines() if line]
    assert [line[:3] for line in lines] == ["<4>", "<6>"]
    first, second = (json.loads(line[3:]) for line in lines)
    assert first["event"] == "checkpoint_corrupt" and first["component"] == "store"
    assert first["path"] == "/x/ckpt-1" and first["level"] == "warning"
    assert second["event"] == "training_resumed" and second["global_step"] == 12
    assert result.stdout == ""


def test_without_the_agent_and_without_logging_config_events_are_readable_lines():
    result = _run(EMIT)
    assert "spotrun_trainer: warning: checkpoint_corrupt path=/x/ckpt-1 reason=sha256" in result.stderr
    assert "spotrun_trainer: training_resumed global_step=12" in result.stderr
    assert "<4>" not in result.stderr


def test_an_application_logging_config_receives_the_records_with_their_fields():
    code = ("import logging\n"
            "seen = []\n"
            "class H(logging.Handler):\n"
            "    def emit(self, r): seen.append((r.name, r.levelname, r.getMessage(), r.spotrun_fields))\n"
            "logging.basicConfig(level=logging.INFO, handlers=[H()])\n"
            + EMIT.replace("; ", "\n") + "\nprint(seen)")
    result = _run(code)
    assert "('spotrun_trainer.store', 'WARNING', 'checkpoint_corrupt'" in result.stdout
    assert "'reason': 'sha256'" in result.stdout
    assert result.stderr == ""


def test_in_the_agents_process_they_join_its_structured_log():
    out = io.StringIO()
    try:
        log.configure(stream=out, job="j1")
        from spotrun_trainer.logs import log_event

        log_event("warning", "checkpoint_corrupt", component="store", path="/x/ckpt-1")
        lines = [line for line in out.getvalue().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("<4>")
        event = json.loads(lines[0][3:])
        assert event["event"] == "checkpoint_corrupt" and event["component"] == "trainer.store"
        assert event["job"] == "j1" and event["path"] == "/x/ckpt-1"
    finally:
        log.configure()
