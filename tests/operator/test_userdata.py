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
    ({"trainer": {"env": {"WANDB_API_KEY": "abc"}}}, "trainer.env.WANDB_API_KEY"),
    ({"trainer": {"env": {"HF_TOKEN": "abc"}}}, "trainer.env.HF_TOKEN"),
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
    (b"#spotrun-config v1\n[job]\nid = \"x\"\n[trainer.env]\nGITHUB_TOKEN = \"x\"\n", "trainer.env.GITHUB_TOKEN"),
    (b"#spotrun-config v1\n" + b"#" * (16 * 1024), "(size)"),
])
def test_malformed_user_data_names_the_field(raw, key):
    with pytest.raises(ConfigError) as err:
        userdata.parse(raw)
    assert err.value.key == key and err.value.source.startswith("user-data")
