"""One validation path for a job file, run by every command before any AWS call (issue 20):
secrets by value and by known name (not by a substring), finite numbers, user-data size,
and availability zones the region really has (asked of EC2 before anything is created)."""
from __future__ import annotations

import pytest

from spotrun import tags
from spotrun.config import ConfigError
from spotrun.usersecrets import check_no_secrets

GHP = "ghp_" + "a1B2c3D4e5" * 4


def _with(job_file, old: str, new: str):
    path = job_file()
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


REFUSED = [
    ("api key in trainer.env", 'EPOCHS = "30"', 'EPOCHS = "30", WANDB_API_KEY = "0123456789abcdef"',
     "trainer.env.WANDB_API_KEY"),
    ("token in the git URL", "https://github.com/", f"https://{GHP}@github.com/", "code.repository"),
    ("user data over 16 KB", 'EPOCHS = "30"', 'EPOCHS = "30", BIG = "' + "x" * 17000 + '"', "trainer.env"),
    ("max_price nan", "[launch]\n", "[launch]\nmax_price = nan\n", "launch.max_price"),
    ("max_price inf", "[launch]\n", "[launch]\nmax_price = inf\n", "launch.max_price"),
    ("inf anywhere", "[aws]\n", "[agent]\nprogress_tag_interval_s = inf\n\n[aws]\n", "agent.progress_tag_interval_s"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_every_command_refuses_before_any_aws_call(case, job_file, recorder, spotrun):
    """Before the fix `init` created volume, role, policy and profile with these files (only
    `launch` rendered the user data) and nan reached CreateFleet: here the recorder saw calls."""
    endpoint, seen = recorder
    _, old, new, field = case
    path = _with(job_file, old, new)
    for command in ("init", "launch", "status", "cancel"):
        code, _, err = spotrun(command, "-f", path, "--endpoint-url", endpoint)
        assert code == 2 and field in err and str(path) in err, (command, err)
    assert seen == []


def test_tokenizers_parallelism_is_a_setting_not_a_secret(job_file, recorder, spotrun):
    """Hugging Face's standard variable; before the fix launch refused it as 'looks like a secret'."""
    endpoint, seen = recorder
    path = _with(job_file, 'EPOCHS = "30"', 'EPOCHS = "30", TOKENIZERS_PARALLELISM = "false", PAD_TOKEN = "<pad>"')
    for command in ("init", "launch"):
        code, out, err = spotrun(command, "--dry-run", "-f", path, "--endpoint-url", endpoint)
        assert code == 0, (command, err)
    assert 'TOKENIZERS_PARALLELISM = "false"' in out and seen == []


@pytest.mark.parametrize("doc, field", [
    ({"trainer": {"env": {"X": "AKIAIOSFODNN7EXAMPLE"}}}, "trainer.env.X"),
    ({"trainer": {"env": {"X": "ASIAIOSFODNN7EXAMPLE"}}}, "trainer.env.X"),
    ({"trainer": {"env": {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}}},
     "trainer.env.AWS_SECRET_ACCESS_KEY"),
    ({"trainer": {"env": {"K": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk="}}}, "trainer.env.K"),
    ({"trainer": {"command": ["python", "t.py", "--token", GHP]}}, "trainer.command"),
    ({"trainer": {"env": {"T": "github_pat_11ABCDEFG0123456789_abcdefghijklmnop"}}}, "trainer.env.T"),
    ({"trainer": {"env": {"T": "glpat-abcdefghij0123456789"}}}, "trainer.env.T"),
    ({"code": {"repository": "https://user:s3cret@gitlab.com/o/r.git"}}, "code.repository"),
    ({"code": {"repository": "https://oauth2token0123@github.com/o/r.git"}}, "code.repository"),
    ({"trainer": {"env": {"HF_TOKEN": "abcd1234efgh"}}}, "trainer.env.HF_TOKEN"),
    ({"trainer": {"env": {"DB_PASSWORD": "hunter22"}}}, "trainer.env.DB_PASSWORD"),
    ({"trainer": {"env": {"CLIENT_SECRET": "c1i3nt-s3cr3t"}}}, "trainer.env.CLIENT_SECRET"),
    ({"trainer": {"env": {"OPENAI_API_KEY": "sk-proj-abc"}}}, "trainer.env.OPENAI_API_KEY"),
])
def test_secrets_by_value_and_by_name(doc, field):
    with pytest.raises(ConfigError) as err:
        check_no_secrets(doc, "job.toml")
    assert err.value.key == field


@pytest.mark.parametrize("doc", [
    {"trainer": {"env": {"TOKENIZERS_PARALLELISM": "false"}}},
    {"trainer": {"env": {"PAD_TOKEN": "<pad>", "EOS_TOKEN": "<|endoftext|>", "MAX_TOKENS": "4096"}}},
    {"trainer": {"env": {"HF_TOKEN_PATH": "/root/.cache/huggingface/token", "WANDB_API_KEY": ""}}},
    {"trainer": {"env": {"DB_PASSWORD": "arn:aws:secretsmanager:us-west-2:123456789012:secret:db"}}},
    {"code": {"repository": "git@github.com:o/r.git", "credentials_ssm_parameter": "/spotrun/j/token"}},
    {"code": {"repository": "ssh://git@github.com/o/r.git"}},
    {"metadata": {"token_ttl_s": 600}},
])
def test_settings_that_merely_mention_a_secret_pass(doc):
    check_no_secrets(doc, "job.toml")


def test_an_az_the_region_lacks_stops_init_before_anything_is_created(moto, client, job_file, job_id, spotrun):
    """`us-west-2z` has the right shape; EC2 (asked first) says the region has no such zone.
    Before the fix init created the volume there and went on."""
    path = _with(job_file, 'volume_availability_zone = "us-west-2b"', 'volume_availability_zone = "us-west-2z"')
    code, _, err = spotrun("init", "-f", path, "--endpoint-url", moto)
    assert code == 2 and "launch.volume_availability_zone" in err and "us-west-2z" in err, err
    assert client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"] == []
    assert f"spotrun-{job_id}" not in [r["RoleName"] for r in client("iam").list_roles()["Roles"]]
    path = _with(job_file, '"us-west-2a", "us-west-2b"', '"us-west-2a", "us-west-2q"')
    code, _, err = spotrun("launch", "-f", path, "--endpoint-url", moto)
    assert code == 2 and "launch.availability_zones" in err and "us-west-2q" in err, err
