"""[sweep] in the job file (issue 19): experiments and grids expand to one job each, and every
bad field is named before any AWS call."""
from __future__ import annotations

import pytest

from spotrun.config import ConfigError
from spotrun.operator import jobfile, sweep

BASE = {"job": {"id": "cifar"}, "code": {"repository": "https://example.com/train.git"},
        "trainer": {"command": ["python", "train.py"], "env": {"SEED": "1", "WARMUP": "0"}}}


def _job(sweep_section, **launch):
    return jobfile.from_mapping({**BASE, "launch": launch, "sweep": sweep_section}, "sweep.toml")


def test_a_grid_expands_to_every_combination_in_order_with_options_appended():
    job = _job({"grid": {"lr": [0.1, 1e-05], "batch_size": [64, 128], "augment": [True]}})
    names = [e.name for e in job.experiments]
    assert names == ["lr0.1-batch_size64-augmenttrue", "lr0.1-batch_size128-augmenttrue",
                     "lr1e-05-batch_size64-augmenttrue", "lr1e-05-batch_size128-augmenttrue"]
    third = job.experiment_job(job.experiments[2])
    assert third.id == "cifar-lr1e-05-batch_size64-augmenttrue"
    assert third.config.trainer.command == ("python", "train.py", "--lr", "1e-05",
                                            "--batch_size", "64", "--augment", "true")
    assert dict(third.config.trainer.env) == {"SEED": "1", "WARMUP": "0"}
    assert job.experiments[2].parameters == {"lr": 1e-05, "batch_size": 64, "augment": True}
    # The base job is untouched: the sweep changes only each experiment's copy.
    assert job.id == "cifar" and job.config.trainer.command == ("python", "train.py")


def test_a_grid_passed_as_environment():
    job = _job({"grid": {"LR": [0.5, 0.25]}, "pass_as": "env"})
    first = job.experiment_job(job.experiments[0])
    assert first.config.trainer.command == ("python", "train.py")
    assert dict(first.config.trainer.env) == {"SEED": "1", "WARMUP": "0", "LR": "0.5"}


def test_named_experiments_override_args_and_env_and_keep_their_order():
    job = _job({"experiments": [
        {"name": "baseline"},
        {"name": "warm", "args": ["--epochs", "30"], "env": {"WARMUP": "5"}}]})
    assert [e.job_id for e in job.experiments] == ["cifar-baseline", "cifar-warm"]
    warm = job.experiment_job(job.experiments[1])
    assert warm.config.trainer.command == ("python", "train.py", "--epochs", "30")
    assert dict(warm.config.trainer.env) == {"SEED": "1", "WARMUP": "5"}
    assert warm.user_data_overrides()["job"]["id"] == "cifar-warm"
    assert "sweep" not in warm.user_data_overrides()


def test_a_file_without_a_sweep_has_no_experiments():
    assert jobfile.from_mapping({**BASE, "launch": {}}).experiments == ()


BAD = [
    ("not a table", ["x"], {}, "sweep"),
    ("neither", {}, {}, "sweep"),
    ("both", {"grid": {"lr": [1]}, "experiments": [{"name": "a"}]}, {}, "sweep"),
    ("unknown key", {"grid": {"lr": [1]}, "grd": 1}, {}, "sweep.grd"),
    ("empty grid", {"grid": {}}, {}, "sweep.grid"),
    ("empty values", {"grid": {"lr": [0.1], "bs": []}}, {}, "sweep.grid.bs"),
    ("a table as a value", {"grid": {"lr": [{"x": 1}]}}, {}, "sweep.grid.lr"),
    ("a value twice", {"grid": {"lr": [0.1, 0.1]}}, {}, "sweep.grid.lr"),
    ("a bad option name", {"grid": {"--lr": [0.1]}}, {}, "sweep.grid.--lr"),
    ("not an env name", {"grid": {"learning-rate": [0.1]}, "pass_as": "env"}, {},
     "sweep.grid.learning-rate"),
    ("bad pass_as", {"grid": {"lr": [0.1]}, "pass_as": "argv"}, {}, "sweep.pass_as"),
    ("pass_as on a list", {"experiments": [{"name": "a"}], "pass_as": "env"}, {}, "sweep.pass_as"),
    ("names that collide", {"grid": {"opt": ["a b", "a_b"]}}, {}, "sweep.grid"),
    ("too many", {"grid": {"a": list(range(11)), "b": list(range(10))}}, {}, "sweep.grid"),
    ("empty list", {"experiments": []}, {}, "sweep.experiments"),
    ("no name", {"experiments": [{"args": ["--x"]}]}, {}, "sweep.experiments[0].name"),
    ("a bad name", {"experiments": [{"name": "a"}, {"name": "a/b"}]}, {},
     "sweep.experiments[1].name"),
    ("a duplicate name", {"experiments": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}, {},
     "sweep.experiments[2].name"),
    ("unknown experiment key", {"experiments": [{"name": "a", "argz": []}]}, {},
     "sweep.experiments[0].argz"),
    ("args not strings", {"experiments": [{"name": "a", "args": ["--lr", 0.1]}]}, {},
     "sweep.experiments[0].args"),
    ("env not a string", {"experiments": [{"name": "a", "env": {"LR": 0.1}}]}, {},
     "sweep.experiments[0].env.LR"),
    ("a job id too long", {"experiments": [{"name": "x" * 60}]}, {}, "sweep.experiments[0].name"),
    ("more instances than experiments", {"experiments": [{"name": "a"}, {"name": "b"}]},
     {"target_capacity": 3}, "launch.target_capacity"),
    ("no lease table", {"experiments": [{"name": "a"}]}, {"lease_table": False}, "sweep"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_sweep_names_its_field(case):
    _, section, launch, field = case
    raw = {**BASE, "launch": launch, "sweep": section}
    if launch.get("lease_table") is False:
        raw["aws"] = {"single_instance": True}
    with pytest.raises(ConfigError) as caught:
        jobfile.from_mapping(raw, "sweep.toml")
    assert caught.value.key == field, str(caught.value)
    assert str(caught.value).startswith("sweep.toml: "), str(caught.value)


def test_a_secret_in_an_experiments_env_is_refused_like_anywhere_else():
    with pytest.raises(ConfigError) as caught:
        _job({"experiments": [{"name": "a", "env": {"AWS_SECRET_ACCESS_KEY": "x" * 40}}]})
    assert "sweep" in caught.value.key, str(caught.value)


def test_the_claim_policy_reaches_the_agent_only_when_not_the_default():
    from spotrun import config as agent_config

    default = _job({"experiments": [{"name": "a"}, {"name": "b"}]})
    assert "claim" not in default.user_data_overrides()["sweep"]
    ordered = _job({"claim": "in-order", "experiments": [{"name": "a"}, {"name": "b"}]})
    overrides = ordered.user_data_overrides()
    assert agent_config.from_mapping(overrides).sweep.claim == "in-order"
    with pytest.raises(ConfigError) as err:
        _job({"claim": "random", "experiments": [{"name": "a"}]})
    assert err.value.key == "sweep.claim"


def test_the_cap_is_the_documented_one():
    within = {"a": list(range(10)), "b": list(range(sweep.MAX_EXPERIMENTS // 10))}
    assert len(_job({"grid": within}).experiments) == sweep.MAX_EXPERIMENTS


SWEEP = """
[sweep.grid]
lr = [0.1, 0.01]
batch_size = [64, 128]
"""


def test_plan_lists_every_experiments_job(job_file, spotrun):
    import json

    path = job_file(job_id="sweep")
    path.write_text(path.read_text() + SWEEP)
    code, out, err = spotrun("plan", "-f", path, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["sweep"] is True and len(plan["jobs"]) == 4
    assert plan["jobs"][1]["command"][-4:] == ["--lr", "0.1", "--batch_size", "128"]
    code, out, _ = spotrun("plan", "-f", path)
    assert code == 0 and "a sweep of 4 experiments" in out and f"{plan['job']}-lr0.01-batch_size128" in out


@pytest.mark.parametrize("fleet", ["ec2-fleet", "asg", "spot-fleet"])
def test_a_sweep_is_initialised_launched_cancelled_and_torn_down_as_one_fleet(
        fleet, moto, client, job_file, spotrun):
    """init: no volume (each experiment's is made by the agent that first claims it), a policy
    scoped to the sweep's jobs; launch: ONE fleet at the file's capacity whose user data
    carries every experiment; cancel and teardown reach every experiment's volume. Judged from
    what moto holds."""
    import base64
    import json

    from spotrun import config as agent_config
    from spotrun import tags, userdata
    from spotrun.operator import launch as launch_mod

    path = job_file(job_id="sweep", fleet=fleet)
    path.write_text(path.read_text().replace("[launch]", "[launch]\ntarget_capacity = 2") + SWEEP)
    job = jobfile.load(path)
    code, out, err = spotrun("init", "--json", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    assert [s["resource"] for s in json.loads(out)["steps"]].count("volume") == 0
    ec2 = client("ec2")
    assert ec2.describe_volumes(Filters=tags.job_filters("sweep"))["Volumes"] == []
    policy = json.loads(json.dumps(client("iam").get_role_policy(
        RoleName=job.role_name, PolicyName="spotrun-agent")["PolicyDocument"]))
    lease = [st for st in policy["Statement"] if st["Sid"] == "JobLease"][0]
    assert lease["Condition"] == {"ForAllValues:StringLike": {
        "dynamodb:LeadingKeys": ["sweep-*", "sweep#sweep"]}}

    code, out, err = spotrun("launch", "--json", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    result = json.loads(out)
    data = ec2.describe_launch_template_versions(
        LaunchTemplateName=result["launch_template"]["LaunchTemplateName"],
        Versions=[result["launch_template"]["Version"]])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    agent = agent_config.from_mapping(userdata.parse(base64.b64decode(data["UserData"])), "user-data")
    assert agent.sweep.id == "sweep"
    assert [e.job for e in agent.sweep.experiments] == [e.job_id for e in job.experiments]
    assert agent.for_experiment(agent.sweep.experiments[1]).trainer.command == \
        job.experiment_job(job.experiments[1]).config.trainer.command
    if fleet == "ec2-fleet":
        [desc] = ec2.describe_fleets(FleetIds=[result["fleet"]["id"]])["Fleets"]
        assert desc["TargetCapacitySpecification"]["TotalTargetCapacity"] == 2
    elif fleet == "asg":
        [group] = client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[result["fleet"]["id"]])["AutoScalingGroups"]
        assert group["DesiredCapacity"] == 2
    else:
        [req] = ec2.describe_spot_fleet_requests(
            SpotFleetRequestIds=[result["fleet"]["id"]])["SpotFleetRequestConfigs"]
        assert req["SpotFleetRequestConfig"]["TargetCapacity"] == 2
    assert launch_mod.plan(job)["user_data_bytes"] < 16 * 1024

    # Two experiments have volumes (as their agents would make them); cancel keeps both,
    # teardown --delete-volume snapshots and deletes both.
    made = [ec2.create_volume(AvailabilityZone="us-west-2a", Size=1, TagSpecifications=[{
        "ResourceType": "volume", "Tags": tags.as_list({tags.NAME: job.config.volume.name_tag,
                                                          tags.JOB: e.job_id})}])["VolumeId"]
            for e in job.experiments[:2]]
    code, out, err = spotrun("status", "--json", "-f", path, "--endpoint-url", moto)
    assert code == 0 and json.loads(out)["outcome"] is None, err  # launched, not ended
    code, out, err = spotrun("cancel", "--json", "-f", path, "--endpoint-url", moto, "--yes")
    assert code == 0, err
    assert sorted(json.loads(out)["volumes_kept"]) == sorted(made)
    # The sweep's fleet is gone: every experiment not done is cancelled, and --watch ends (3).
    code, out, err = spotrun("status", "--json", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    assert {row["outcome"] for row in json.loads(out)["experiments"]} == {"cancelled"}, out
    code, _, err = spotrun("status", "--watch", "--count", "1", "-f", path, "--endpoint-url", moto)
    assert code == 3, err
    code, out, err = spotrun("teardown", "--json", "-f", path, "--endpoint-url", moto, "--yes",
                             "--delete-volume")
    assert code == 0, err
    left = [v["VolumeId"] for e in job.experiments
            for v in ec2.describe_volumes(Filters=tags.job_filters(e.job_id))["Volumes"]
            if v["State"] not in ("deleting", "deleted")]
    assert left == []
    finals = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{tags.ROLE}", "Values": ["final-snapshot"]}])["Snapshots"]
    # each kept as a snapshot first (moto's server is shared by the whole session: only ours)
    assert sorted(s["VolumeId"] for s in finals if s["VolumeId"] in made) == sorted(made)


def test_each_experiment_can_be_written_as_a_job_file_of_its_own(job_file, recorder, spotrun,
                                                                  tmp_path):
    """For one fleet per experiment, if wanted: one single-job file per experiment, each one
    loading as that experiment's job (its id, command, env; one instance) and planned by init."""
    endpoint, seen = recorder
    path = job_file(job_id="sweep")
    path.write_text(path.read_text().replace("[launch]", "[launch]\ntarget_capacity = 2")
                    + SWEEP)
    sweep_job = jobfile.load(path)
    out = tmp_path / "jobs"
    code, _, err = spotrun("plan", "-f", path, "--write-job-files", out)
    assert code == 0, err
    written = sorted(out.glob("*.toml"))
    assert [p.stem for p in written] == sorted(e.job_id for e in sweep_job.experiments)
    for experiment in sweep_job.experiments:
        own = jobfile.load(out / f"{experiment.job_id}.toml")
        expected = sweep_job.experiment_job(experiment)
        assert own.experiments == () and own.id == experiment.job_id
        assert own.config == expected.config
        assert own.launch.target_capacity == 1
        assert own.launch.instance_types == sweep_job.launch.instance_types
        assert own.launch.availability_zones == sweep_job.launch.availability_zones
        assert spotrun("init", "--dry-run", "-f", out / f"{experiment.job_id}.toml",
                       "--endpoint-url", endpoint)[0] == 0
    assert seen == []
    # Nothing is replaced: a second run is refused and leaves the files as they were.
    before = {p: p.read_text() for p in written}
    code, _, err = spotrun("plan", "-f", path, "--write-job-files", out)
    assert code == 2 and "exists; nothing was written" in err, err
    assert {p: p.read_text() for p in written} == before


def test_status_of_a_sweep_shows_one_row_per_experiment(moto, client, job_file, spotrun, tmp_path):
    """Each experiment looked up as its own job: two launched from the written job files (one
    training, one done, as their agents record it on their volumes), two never started."""
    import json

    from spotrun import tags

    path = job_file(job_id="sw")
    path.write_text(path.read_text() + SWEEP)
    sweep_job = jobfile.load(path)
    out = tmp_path / "jobs"
    assert spotrun("plan", "-f", path, "--write-job-files", out)[0] == 0
    first, second = sweep_job.experiments[:2]
    recorded = {first.job_id: {tags.PHASE: "training", tags.INTERRUPTIONS: "1",
                               tags.PROGRESS: json.dumps({"epoch": 2, "epochs": 30, "step": 7})},
                second.job_id: {tags.PHASE: "done", tags.COMPLETED: "2026-12-02T10:00:00Z"}}
    for job_id, values in recorded.items():
        own = out / f"{job_id}.toml"
        for command in ("init", "launch"):
            code, _, err = spotrun(command, "--json", "-f", own, "--endpoint-url", moto)
            assert code == 0, err
        (volume,) = client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]
        client("ec2").create_tags(Resources=[volume["VolumeId"]], Tags=tags.as_list(values))

    code, text, err = spotrun("status", "--json", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    view = json.loads(text)
    rows = {row["job"]: row for row in view["experiments"]}
    assert list(rows) == [e.job_id for e in sweep_job.experiments]
    assert rows[first.job_id]["phase"] == "training" and rows[first.job_id]["outcome"] is None
    assert rows[first.job_id]["progress"]["epoch"] == 2 and rows[first.job_id]["interruptions"] == 1
    assert rows[first.job_id]["parameters"] == {"lr": 0.1, "batch_size": 64}
    assert rows[second.job_id]["outcome"] == "done"
    for never in sweep_job.experiments[2:]:
        assert rows[never.job_id]["phase"] == "not started" and rows[never.job_id]["instances"] == []
    assert view["outcome"] is None  # two have not even started
    code, text, err = spotrun("status", "-f", path, "--endpoint-url", moto)
    assert code == 0 and "4 experiments" in text, err
    assert f"{first.name}" in text and "epoch 2/30, step 7" in text and "not started" in text


def test_a_sweeps_outcome_waits_for_every_experiment():
    from spotrun.operator.status import sweep_outcome

    assert sweep_outcome([{"outcome": "done"}, {"outcome": None}]) is None
    assert sweep_outcome([{"outcome": "done"}, {"outcome": "done"}]) == "done"
    assert sweep_outcome([{"outcome": "done"}, {"outcome": "failed"}]) == "failed"
    assert sweep_outcome([{"outcome": "cancelled"}, {"outcome": "done"}]) == "cancelled"
    assert sweep_outcome([]) is None
