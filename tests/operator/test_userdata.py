"""The user-data stub: round trip, size limit, secrets refused, malformed input named."""
from __future__ import annotations

import pytest

from spotrun import config, userdata
from spotrun.config import ConfigError
from spotrun.operator import jobfile


def _job(job_file, **kw):
    return jobfile.load(job_file(**kw))


def test_round_trip_gives_the_agent_the_job(job_file):
    job = _job(job_file)
    raw = userdata.render(job)
    assert raw.startswith(b"#spotrun-config v1\n")
    overrides = userdata.parse(raw)
    agent = config.load(None, (overrides, "user-data"))
    assert agent.job.id == job.id
    assert agent.code.repository == "https://github.com/example-org/spot-training.git"
    assert agent.code.ref == "v1.0"
    assert agent.trainer.command == ("python", "train.py", "--epochs", "30")
    assert agent.trainer.env == {"EPOCHS": "30"}
    assert agent.volume.size_gib == 20
    assert agent.aws.lease_table == f"leases-{job.id}"
    # The operator's own settings stay on the laptop.
    assert "launch" not in overrides and "region" not in overrides.get("aws", {})
    assert b"ami-" not in raw and b"p3.2xlarge" not in raw


def test_stub_is_a_few_lines_well_under_16kb(job_file):
    raw = userdata.render(_job(job_file))
    assert len(raw) < 1024 and raw.count(b"\n") < 40


def test_oversized_config_is_refused_with_the_limit_named():
    overrides = {"job": {"id": "big"}, "code": {"repository": "https://example.com/r.git"},
                 "trainer": {"env": {f"VAR_{i}": "x" * 200 for i in range(100)}}}
    with pytest.raises(ConfigError) as err:
        userdata.render(overrides)
    assert "16384" in str(err.value) and err.value.key == "(size)"


def test_pointer_stub_resolves_through_the_given_reader():
    inline = userdata.render({"job": {"id": "j1"}, "code": {"repository": "https://example.com/r.git"}})
    stub = userdata.render(None, ssm_parameter="/spotrun/jobs/j1")
    assert userdata.pointer(stub) == "/spotrun/jobs/j1" and userdata.pointer(inline) is None
    fetched = []
    overrides = userdata.parse(stub, fetch_parameter=lambda name: fetched.append(name) or inline.decode())
    assert fetched == ["/spotrun/jobs/j1"] and overrides["job"]["id"] == "j1"
    with pytest.raises(ConfigError) as err:
        userdata.parse(stub)
    assert err.value.key == "spotrun.ssm_parameter"


@pytest.mark.parametrize("overrides, field", [
    ({"trainer": {"env": {"WANDB_API_KEY": "3f9a1c2e7b"}}}, "trainer.env.WANDB_API_KEY"),
    ({"trainer": {"env": {"HF_TOKEN": "abcd1234efgh"}}}, "trainer.env.HF_TOKEN"),
    ({"trainer": {"env": {"X": "AKIAABCDEFGHIJKLMNOP"}}}, "trainer.env.X"),
    ({"code": {"repository": "https://user:s3cret@github.com/o/r.git"}}, "code.repository"),
    ({"code": {"repository": "https://ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/o/r.git"}},
     "code.repository"),
    ({"trainer": {"command": ["python", "t.py", "--key", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"]}},
     "trainer.command"),
])
def test_secrets_are_refused_naming_the_field(overrides, field):
    base = {"job": {"id": "j"}, "code": {"repository": "https://example.com/r.git"}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        userdata.render(base)
    assert err.value.key == field


def test_pointers_to_secrets_are_allowed():
    raw = userdata.render({"job": {"id": "j"}, "code": {
        "repository": "https://example.com/r.git", "credentials_ssm_parameter": "/spotrun/j/git-token"}})
    assert userdata.parse(raw)["code"]["credentials_ssm_parameter"] == "/spotrun/j/git-token"


@pytest.mark.parametrize("raw, key", [
    (b"#!/bin/bash\necho hi\n", "(marker)"),
    (b"", "(marker)"),
    (b"\xff\xfe#spotrun", "(encoding)"),
    (b"#spotrun-config v1\n[job\nid=1", "(syntax)"),
    (b"#spotrun-config v1\n[trainer]\nmax_restarts = \"three\"\n", "trainer.max_restarts"),
    (b"#spotrun-config v1\n[bogus]\nx = 1\n", "bogus"),
    (b"#spotrun-config v1\n[job]\nid = \"x\"\n[trainer.env]\nGITHUB_TOKEN = \"abcd1234efgh\"\n", "trainer.env.GITHUB_TOKEN"),
    (b"#spotrun-config v1\n" + b"#" * (16 * 1024), "(size)"),
])
def test_malformed_user_data_names_the_field(raw, key):
    with pytest.raises(ConfigError) as err:
        userdata.parse(raw)
    assert err.value.key == key and err.value.source.startswith("user-data")


def test_awkward_values_survive_the_round_trip():
    overrides = {"job": {"id": "j"}, "code": {"repository": "https://example.com/r.git", "ref": "release/1.0"},
                 "trainer": {"command": ["python", "-c", "print('a \"b\" \\\\ c')"],
                             "env": {"WITH SPACE": "x y", "DOTTED.NAME": "1", "UNICODE": "é\u2603", "NL": "a\nb"}},
                 "volume": {"encrypted": False, "snapshot_retention_days": 1.5, "size_gib": 500}}
    raw = userdata.render(overrides)
    assert userdata.parse(raw) == overrides
    assert raw.count(b"\n") == 2 + 4 + 8  # header, sections, one line per key: arrays/tables inline


def test_progress_is_drawn_on_a_terminal_and_silent_otherwise():
    import io

    from spotrun.operator.progress import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    states = iter(["creating", "creating", "available"])

    def check():
        state = next(states)
        return state == "available", state

    screen = Terminal()
    assert Reporter(stream=screen, interval_s=0).wait("volume vol-1", check, timeout_s=30) == "available"
    drawn = screen.getvalue()
    assert "waiting for volume vol-1: creating (0s so far)" in drawn and "volume vol-1: available after" in drawn
    pipe = io.StringIO()
    states = iter(["creating", "available"])
    Reporter(stream=pipe, interval_s=0).wait("volume vol-2", check, timeout_s=30)
    assert pipe.getvalue() == ""


def test_a_wait_that_never_ends_says_what_it_waited_for():
    import io

    from spotrun.errors import SpotrunError
    from spotrun.operator.progress import Reporter

    with pytest.raises(SpotrunError) as err:
        Reporter(stream=io.StringIO(), interval_s=0.01).wait("snapshot snap-1", lambda: (False, "pending 40%"), 0.05)
    assert "snapshot snap-1" in str(err.value) and "pending 40%" in str(err.value)


def test_the_agent_accepts_what_the_operator_sends_hugging_face_settings_included():
    # One secret check on both sides: a setting whose name merely contains "token" is no secret.
    stub = userdata.render({"job": {"id": "x"}, "trainer": {"env": {"TOKENIZERS_PARALLELISM": "false",
                                                                    "PAD_TOKEN": "<pad>"}}})
    assert userdata.parse(stub)["trainer"]["env"]["TOKENIZERS_PARALLELISM"] == "false"
