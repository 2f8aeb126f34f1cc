"""Issue 19, "data once, volumes per job": ``[sweep] dataset_volume`` is snapshotted once by
`spotrun init`; `spotrun launch` hands that snapshot to every instance as
``[volume] source_snapshot``; `spotrun teardown --delete-snapshots` deletes it.

The commands are the real CLI, in-process, against the local spot cloud (moto behind the
cloud's proxy, EBS images on loop devices, snapshots pending before completed); judged by the
cloud's call ledger, EC2's state and the snapshot's own bytes."""
from __future__ import annotations

import base64
import json
import os

import pytest

from spotrun import config as agent_config
from spotrun import iam, tags, userdata
from spotrun.config import ConfigError
from spotrun.operator import jobfile

BASE = {"job": {"id": "cifar"}, "code": {"repository": "https://example.com/train.git"},
        "launch": {}}
EXPERIMENTS = [{"name": "a"}, {"name": "b"}]

JOB_TOML = """
[job]
id = "{job_id}"

[code]
repository = "https://example.com/train.git"

[volume]
size_gib = 1

[aws]
region = "{region}"
lease_table = "leases-{job_id}"

[launch]
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge"]
availability_zones = ["{region}a", "{region}b"]

[sweep]
dataset_volume = "{volume}"

[[sweep.experiments]]
name = "a"

[[sweep.experiments]]
name = "b"
"""

BAD = [
    ("not a volume id", {"dataset_volume": "snap-0123456789abcdef0"}, {}, "sweep.dataset_volume"),
    ("not a string", {"dataset_volume": 12}, {}, "sweep.dataset_volume"),
    ("a short id", {"dataset_volume": "vol-12"}, {}, "sweep.dataset_volume"),
    ("source_snapshot by hand in a sweep", {"dataset_volume": "vol-0123456789abcdef0"},
     {"volume": {"source_snapshot": "snap-0123456789abcdef0"}}, "volume.source_snapshot"),
    ("source_snapshot by hand in a single job", None,
     {"volume": {"source_snapshot": "snap-0123456789abcdef0"}}, "volume.source_snapshot"),
    ("source_snapshot not a snapshot id", None,
     {"volume": {"source_snapshot": "vol-0123456789abcdef0"}}, "volume.source_snapshot"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_dataset_setting_names_its_field(case):
    _, sweep_extra, sections, field = case
    raw = {**BASE, **sections}
    if sweep_extra is not None:
        raw["sweep"] = {"experiments": EXPERIMENTS, **sweep_extra}
    with pytest.raises(ConfigError) as caught:
        jobfile.from_mapping(raw, "sweep.toml")
    assert caught.value.key == field, str(caught.value)


def test_a_sweep_without_a_dataset_volume_is_as_before():
    job = jobfile.from_mapping({**BASE, "sweep": {"experiments": EXPERIMENTS}})
    assert job.dataset_volume == "" and "volume" not in job.user_data_overrides()
    with_it = jobfile.from_mapping({**BASE, "sweep": {"experiments": EXPERIMENTS,
                                                      "dataset_volume": "vol-0123456789abcdef0"}})
    assert with_it.dataset_volume == "vol-0123456789abcdef0"
    sent = with_it.with_source_snapshot("snap-0123456789abcdef0").user_data_overrides()
    assert agent_config.from_mapping(sent).volume.source_snapshot == "snap-0123456789abcdef0"


def test_init_dry_run_plans_the_dataset_snapshot_without_a_call(job_file, recorder, spotrun):
    endpoint, seen = recorder
    path = job_file(text=JOB_TOML.format(job_id="dry", region="us-west-2",
                                         volume="vol-0123456789abcdef0"))
    code, out, err = spotrun("init", "--dry-run", "--json", "-f", path, "--endpoint-url", endpoint)
    assert code == 0, err
    [step] = [s for s in json.loads(out)["plan"] if s["resource"] == "dataset-snapshot"]
    assert step["name"] == "vol-0123456789abcdef0"
    assert seen == []


def test_the_sweeps_agents_may_restore_the_dataset_snapshot_but_never_delete_it():
    policy = iam.agent_policy("cifar", lease_table="t", sweep=True)
    statements = {s["Sid"]: s for s in policy["Statement"]}
    restore = statements["SnapshotAndRestoreJobResources"]
    assert "ec2:CreateVolume" in restore["Action"]
    assert restore["Condition"]["StringLike"][f"aws:ResourceTag/{tags.JOB}"] == ["cifar", "cifar-*"]
    delete = statements["DeleteJobSnapshots"]
    assert delete["Condition"]["StringNotEquals"] == {
        f"aws:ResourceTag/{tags.ROLE}": tags.DATASET_SNAPSHOT_ROLE}


# -- on the local spot cloud -------------------------------------------------------------------

@pytest.fixture
def cloud(tmp_path, aws_env):
    from spotrun.localcloud import LocalCloud, TimingModel

    cloud = LocalCloud(tmp_path / "cloud", TimingModel.fast()).start()
    try:
        if not cloud.uses_loop_devices:
            pytest.skip("loop devices unavailable: the dataset volume is an ext4 image")
        yield cloud
    finally:
        cloud.stop()


def _dataset_volume(cloud, tmp_path, data: bytes) -> str:
    """The user's volume, prepared the seed's way: ext4 with datasets/ on it (the helper
    `make demo-sweep` prepares its dataset with too)."""
    from spotrun.harness.soaksweep import prepare_dataset_volume

    return prepare_dataset_volume(cloud.client("ec2", faults=False), cloud.dataplane.volume_path,
                                  f"{cloud.region}a", {"datasets/train.bin": data})


def _dataset_snapshots(cloud, job_id: str) -> list[dict]:
    found = cloud.client("ec2", faults=False).describe_snapshots(OwnerIds=["self"], Filters=[
        *tags.job_filters(job_id), {"Name": f"tag:{tags.ROLE}", "Values": [tags.DATASET_SNAPSHOT_ROLE]}])
    return found["Snapshots"]


def _operator_calls(cloud, *actions: str) -> list[dict]:
    from spotrun.localcloud.ledger import calls, performed

    return [r for r in calls(cloud.ledger(), actions or None, checker=False) if performed(r)]


@pytest.mark.loopdev
def test_init_snapshots_the_dataset_once_and_launch_hands_it_to_every_instance(
        cloud, tmp_path, job_file, spotrun):
    from spotrun.harness.rehearsal_volume import VolumeImage

    endpoint = ("--endpoint-url", cloud.ec2_endpoint)
    # A volume that does not exist: init stops before changing anything (exit 2, the field).
    missing = job_file(job_id="ds-missing", text=JOB_TOML.format(
        job_id="ds", region=cloud.region, volume="vol-0123456789abcdef0"))
    code, _, err = spotrun("init", "-f", missing, *endpoint)
    assert code == 2 and "sweep.dataset_volume" in err and "vol-0123456789abcdef0" in err, err
    assert _operator_calls(cloud) and [r["action"] for r in _operator_calls(cloud)
                                       if not r["action"].startswith(("Describe", "Get"))] == []

    data = os.urandom(64 * 1024)
    volume_id = _dataset_volume(cloud, tmp_path, data)
    path = job_file(job_id="ds", text=JOB_TOML.format(job_id="ds", region=cloud.region,
                                                      volume=volume_id))
    code, out, err = spotrun("init", "--json", "-f", path, *endpoint)
    assert code == 0, err
    [snapshot] = _dataset_snapshots(cloud, "ds")
    assert snapshot["State"] == "completed" and snapshot["VolumeId"] == volume_id
    [step] = [s for s in json.loads(out)["steps"] if s["resource"] == "dataset-snapshot"]
    assert (step["action"], step["name"]) == ("created", snapshot["SnapshotId"])
    # The snapshot's own bytes: the dataset as prepared.
    image = VolumeImage(cloud.dataplane.snapshot_path(snapshot["SnapshotId"]))
    assert image.read(["datasets/train.bin"]) == {"datasets/train.bin": data}

    # Run again: the same snapshot, no second one (the cloud's record of CreateSnapshot).
    code, out, err = spotrun("init", "--json", "-f", path, *endpoint)
    assert code == 0, err
    assert [s["SnapshotId"] for s in _dataset_snapshots(cloud, "ds")] == [snapshot["SnapshotId"]]
    assert len(_operator_calls(cloud, "CreateSnapshot")) == 1

    # No completed dataset snapshot: launch refuses (exit 2, says to run init), launches nothing.
    cloud.client("ec2", faults=False).delete_snapshot(SnapshotId=snapshot["SnapshotId"])
    code, _, err = spotrun("launch", "-f", path, *endpoint)
    assert code == 2 and "spotrun init" in err and "sweep.dataset_volume" in err, err
    assert _operator_calls(cloud, "CreateLaunchTemplate", "CreateFleet") == []

    assert spotrun("init", "-f", path, *endpoint)[0] == 0
    [again] = _dataset_snapshots(cloud, "ds")
    code, out, err = spotrun("launch", "--json", "-f", path, *endpoint)
    assert code == 0, err
    result = json.loads(out)
    data_of_template = cloud.client("ec2", faults=False).describe_launch_template_versions(
        LaunchTemplateName=result["launch_template"]["LaunchTemplateName"],
        Versions=[result["launch_template"]["Version"]])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    agent = agent_config.from_mapping(userdata.parse(base64.b64decode(data_of_template["UserData"])))
    assert agent.volume.source_snapshot == again["SnapshotId"]
    assert agent.sweep.id == "ds" and len(agent.sweep.experiments) == 2

    # Teardown keeps the sweep's dataset snapshot unless asked; --delete-snapshots deletes it.
    assert spotrun("cancel", "-f", path, *endpoint, "--yes")[0] == 0
    code, out, err = spotrun("teardown", "--json", "-f", path, *endpoint, "--yes")
    assert code == 0, err
    assert [s["SnapshotId"] for s in _dataset_snapshots(cloud, "ds")] == [again["SnapshotId"]]
    code, out, err = spotrun("teardown", "--json", "-f", path, *endpoint, "--yes",
                             "--delete-snapshots")
    assert code == 0, err
    assert _dataset_snapshots(cloud, "ds") == []
    assert [r["resources"] for r in _operator_calls(cloud, "DeleteSnapshot")][-1] == [again["SnapshotId"]]
