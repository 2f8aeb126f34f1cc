"""Job file validation: every bad field is named, exit 2, and no AWS request is made."""
from __future__ import annotations

import pytest

from spotrun.operator import jobfile

BAD = [
    ("missing repository", "[job]\nid = \"j\"\n[launch]\nimage_id = \"ami-0123456789abcdef0\"\n",
     "code.repository"),
    ("bad instance type", "launch_types", "launch.instance_types"),
    ("negative price", "max_price = -0.5", "launch.max_price"),
    ("unknown launch key", "instance_typ = [\"p3.2xlarge\"]", "launch.instance_typ"),
    ("unknown agent key", "[agent]\nlog_levl = \"info\"\n", "agent.log_levl"),
    ("unknown section", "[lunch]\nx = 1\n", "lunch"),
    ("bad fleet kind", "fleet = \"spot-fleets\"", "launch.fleet"),
    ("az outside region", "volume_availability_zone = \"eu-west-1a\"", "launch.volume_availability_zone"),
    ("bad subnet", "subnets = [\"sub-123\"]", "launch.subnets"),
    ("bad image", "image_id = \"ubuntu\"", "launch.image_id"),
    ("zero capacity", "target_capacity = 0", "launch.target_capacity"),
    ("no lease table, no promise", "lease_table = false", "launch.lease_table"),
]


def _text(job_file, case):
    name, extra, _ = case
    if extra.startswith("[job]"):
        return job_file(text=extra)
    if extra == "launch_types":
        path = job_file()
        path.write_text(path.read_text().replace('"p2.xlarge"', '"p2-xlarge"'))
        return path
    if extra.startswith("["):
        path = job_file()
        path.write_text(extra + path.read_text())
        return path
    path = job_file()
    text = path.read_text()
    key = extra.split("=")[0].strip()
    # Replace a key the template already sets, else add it to [launch].
    lines = [line for line in text.splitlines() if not line.startswith(key + " ")]
    path.write_text("\n".join(lines) + "\n" + extra + "\n")
    return path


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_job_file_fails_before_any_aws_call(case, job_file, recorder, spotrun):
    endpoint, seen = recorder
    path = _text(job_file, case)
    for command in ("launch", "init", "status", "cancel"):
        code, out, err = spotrun(command, "-f", path, "--endpoint-url", endpoint)
        assert code == 2, (command, err)
        assert case[2] in err and str(path) in err, err
    assert seen == []


def test_good_job_file_reaches_the_endpoint(job_file, recorder, spotrun):
    """The recorder does see requests when the file is fine: the test above can fail."""
    endpoint, seen = recorder
    code, _, err = spotrun("launch", "-f", job_file(), "--endpoint-url", endpoint)
    assert code == 1 and seen, err
    # The first call checks the job's zones exist in the region, before anything is created.
    assert "AWS DescribeAvailabilityZones failed" in err and "Traceback" not in err


def test_dry_runs_make_no_aws_call(job_file, recorder, spotrun):
    endpoint, seen = recorder
    for fleet in jobfile.FLEET_KINDS:
        path = job_file(fleet=fleet)
        assert spotrun("init", "--dry-run", "-f", path, "--endpoint-url", endpoint)[0] == 0
        code, out, _ = spotrun("launch", "--dry-run", "--json", "-f", path, "--endpoint-url", endpoint)
        assert code == 0 and '"HttpTokens": "required"' in out
    assert seen == []


def test_examples_are_valid():
    from pathlib import Path
    examples = sorted((Path(__file__).parents[2] / "examples" / "jobs").glob("*.toml"))
    assert examples
    for path in examples:
        job = jobfile.load(path)
        assert job.id and job.launch.image_id


def test_instance_type_formats():
    ok = ["p3.2xlarge", "p2.xlarge", "g4dn.xlarge", "g5.48xlarge", "trn1n.32xlarge", "u-6tb1.metal", "t3.micro"]
    bad = ["p3", "p3.2xl", "P3.2xlarge", "p3-2xlarge", "p3.2xlarge ", "xlarge"]
    for name in ok:
        assert jobfile._INSTANCE_TYPE.match(name), name
    for name in bad:
        assert not jobfile._INSTANCE_TYPE.match(name), name


def test_the_lease_table_is_the_default_and_going_without_needs_the_promise():
    """Issue 21: the agent refuses to run without a lease table unless aws.single_instance
    says no second instance can run; the job file keeps the two consistent."""
    from spotrun.config import ConfigError

    base = {"job": {"id": "j"}, "code": {"repository": "https://example.org/t.git"}}
    job = jobfile.from_mapping(base)
    assert job.lease_table == jobfile.DEFAULT_LEASE_TABLE
    assert job.user_data_overrides()["aws"]["lease_table"] == jobfile.DEFAULT_LEASE_TABLE
    with pytest.raises(ConfigError) as err:
        jobfile.from_mapping({**base, "launch": {"lease_table": False}})
    assert err.value.key == "launch.lease_table" and "aws.single_instance" in str(err.value)
    promised = jobfile.from_mapping({**base, "aws": {"single_instance": True},
                                     "launch": {"lease_table": False}})
    assert promised.lease_table == ""
    assert promised.user_data_overrides()["aws"] == {"single_instance": True}
    with pytest.raises(ConfigError) as err:
        jobfile.from_mapping({**base, "aws": {"single_instance": True},
                              "launch": {"target_capacity": 2}})
    assert err.value.key == "launch.target_capacity"
