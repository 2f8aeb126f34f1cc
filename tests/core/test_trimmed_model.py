"""The agent's trimmed botocore models (spotrun.botomodel): every operation it calls, exactly as
in botocore's full model; real calls through them on the local cloud; anything wrong with the
cache means the full model and a warning, never a failed client."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from botocore.loaders import Loader
from botocore.model import ServiceModel

from spotrun import awsclients, botomodel, ec2, lease, log
from spotrun.config import AwsConfig
from spotrun.iam import AGENT_CALLS
from spotrun.localcloud import LocalCloud, TimingModel
from spotrun.localcloud.cloud import DUMMY_CREDENTIALS

FULL = Loader()  # botocore's own search path: the full models


@pytest.fixture(autouse=True)
def _full_models_and_default_logging_afterwards(monkeypatch):
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    yield
    awsclients.use_trimmed_models(None)
    log.configure()


def _trimmed_loader(cache: Path, service: str) -> Loader:
    data_dir = botomodel.ensure(service, botomodel.agent_operations()[service], cache,
                                FULL.search_paths)
    return Loader(extra_search_paths=[str(data_dir)])


def _resolved(shape, seen=()) -> object:
    """A botocore Shape as plain data, members resolved (recursion cut at a repeated name)."""
    if shape is None:
        return None
    if shape.name in seen:
        return {"recursive": shape.name}
    seen = (*seen, shape.name)
    out = {"name": shape.name, "type": shape.type_name, "serialization": shape.serialization,
           "metadata": shape.metadata}
    if shape.type_name == "structure":
        out["members"] = {k: _resolved(v, seen) for k, v in shape.members.items()}
    elif shape.type_name == "list":
        out["member"] = _resolved(shape.member, seen)
    elif shape.type_name == "map":
        out["key"], out["value"] = _resolved(shape.key, seen), _resolved(shape.value, seen)
    return out


@pytest.mark.parametrize("service", sorted(botomodel.agent_operations()))
def test_each_agent_operation_is_the_full_models_own(tmp_path, service):
    full = ServiceModel(FULL.load_service_model(service, "service-2"), service)
    trimmed = ServiceModel(_trimmed_loader(tmp_path, service).load_service_model(service, "service-2"),
                           service)
    wanted = [a.split(":", 1)[1] for a, _ in AGENT_CALLS if a.startswith(f"{service}:")]
    assert sorted(trimmed.operation_names) == sorted(wanted)
    assert trimmed.metadata == full.metadata
    for name in wanted:
        mine, theirs = trimmed.operation_model(name), full.operation_model(name)
        assert mine.http == theirs.http and mine.metadata == theirs.metadata
        for part in ("input_shape", "output_shape"):
            assert _resolved(getattr(mine, part)) == _resolved(getattr(theirs, part)), (name, part)
        assert ([_resolved(e) for e in mine.error_shapes]
                == [_resolved(e) for e in theirs.error_shapes]), name
    assert len(full.operation_names) > len(wanted)  # the full model was read, not a copy of mine


def test_an_operation_outside_the_list_is_absent_and_an_unknown_one_is_named(tmp_path):
    trimmed = _trimmed_loader(tmp_path, "ec2").load_service_model("ec2", "service-2")
    assert "RunInstances" not in trimmed["operations"]
    assert "RunInstancesRequest" not in trimmed["shapes"]
    with pytest.raises(KeyError, match="NoSuchCall"):
        botomodel.trim(FULL.load_service_model("ec2", "service-2"), ["DescribeVolumes", "NoSuchCall"])


def _agent_client(service: str, cloud: LocalCloud):
    aws = AwsConfig(endpoint_url=cloud.ec2_endpoint, retry_mode="standard", max_attempts=1)
    return ec2.client(service, aws, cloud.region)


def _loaded_from(client) -> str:
    service = client.meta.service_model
    loader = awsclients._session.get_component("data_loader")
    return loader.load_data_with_path(
        f"{service.service_name}/{service.api_version}/service-2")[1]


@pytest.fixture
def cloud(tmp_path):
    made = LocalCloud(root=tmp_path / "cloud", timing=TimingModel.fast(), use_loop_devices=False)
    made.start()
    yield made
    made.stop()


def _plain(response: dict) -> dict:
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def test_the_agents_ec2_calls_go_through_the_trimmed_model(tmp_path, cloud):
    awsclients.use_trimmed_models(tmp_path / "models")
    client = _agent_client("ec2", cloud)
    assert _loaded_from(client).startswith(str(tmp_path / "models"))
    assert not hasattr(client, "run_instances")
    full = cloud.client("ec2", faults=False)
    az = cloud.azs[0]

    volume = client.create_volume(
        AvailabilityZone=az, Size=1, VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "spotrun:job", "Value": "t"}]}])
    client.create_tags(Resources=[volume["VolumeId"]], Tags=[{"Key": "step", "Value": "one"}])
    filters = [{"Name": "tag:spotrun:job", "Values": ["t"]}, {"Name": "availability-zone", "Values": [az]}]
    pages = list(client.get_paginator("describe_volumes").paginate(Filters=filters))
    found = [v for page in pages for v in page["Volumes"]]
    assert [v["VolumeId"] for v in found] == [volume["VolumeId"]]
    assert {t["Key"]: t["Value"] for t in found[0]["Tags"]} == {"spotrun:job": "t", "step": "one"}
    # Parsed exactly as botocore's full model parses the same answer.
    assert _plain(client.describe_volumes(Filters=filters)) == _plain(full.describe_volumes(Filters=filters))
    tags = [t for page in client.get_paginator("describe_tags").paginate(
        Filters=[{"Name": "resource-id", "Values": [volume["VolumeId"]]}]) for t in page["Tags"]]
    assert {t["Key"] for t in tags} == {"spotrun:job", "step"}

    snapshot = client.create_snapshot(VolumeId=volume["VolumeId"])
    listed = [s["SnapshotId"] for page in client.get_paginator("describe_snapshots").paginate(
        OwnerIds=["self"], Filters=[{"Name": "volume-id", "Values": [volume["VolumeId"]]}])
        for s in page["Snapshots"]]
    assert listed == [snapshot["SnapshotId"]]
    assert _plain(client.describe_instances()) == _plain(full.describe_instances())

    client.delete_snapshot(SnapshotId=snapshot["SnapshotId"])
    client.delete_volume(VolumeId=volume["VolumeId"])
    with pytest.raises(ClientError) as gone:
        client.describe_volumes(VolumeIds=[volume["VolumeId"]])
    assert gone.value.response["Error"]["Code"] == "InvalidVolume.NotFound"


def test_the_lease_calls_and_their_modelled_error_go_through_the_trimmed_model(tmp_path, cloud):
    cloud.client("dynamodb", faults=False).create_table(**lease.table_definition("leases"))
    awsclients.use_trimmed_models(tmp_path / "models")
    db = _agent_client("dynamodb", cloud)
    assert _loaded_from(db).startswith(str(tmp_path / "models"))
    item = {"job": {"S": "j"}, "holder": {"S": "i-1"}, "generation": {"N": "1"}}
    db.put_item(TableName="leases", Item=item, ConditionExpression="attribute_not_exists(job)")
    assert db.get_item(TableName="leases", Key={"job": {"S": "j"}}, ConsistentRead=True)["Item"] == item
    with pytest.raises(db.exceptions.ConditionalCheckFailedException):
        db.put_item(TableName="leases", Item=item, ConditionExpression="attribute_not_exists(job)")


def test_a_torn_cached_model_is_made_again(tmp_path):
    first = botomodel.ensure("ec2", botomodel.agent_operations()["ec2"], tmp_path, FULL.search_paths)
    [cached] = first.rglob("service-2.json")
    whole = json.loads(cached.read_text())
    cached.write_text(cached.read_text()[: 1000])
    assert botomodel.ensure("ec2", botomodel.agent_operations()["ec2"], tmp_path, FULL.search_paths) == first
    assert json.loads(cached.read_text()) == whole


def _warnings(out: io.StringIO) -> list[dict]:
    return [json.loads(line[3:]) for line in out.getvalue().splitlines() if line.startswith("<4>")]


def test_an_unusable_cache_means_the_full_model_and_a_warning(tmp_path, monkeypatch):
    out = io.StringIO()
    log.configure(stream=out)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    awsclients.use_trimmed_models(blocker / "models")  # nothing can be made under a file
    client = ec2.client("ec2", AwsConfig(), "us-east-1")
    assert "RunInstances" in client.meta.service_model.operation_names
    [warning] = _warnings(out)
    assert warning["event"] == "botocore_model_full" and warning["service"] == "ec2"
    assert "NotADirectoryError" in warning["error"]


def test_a_cached_model_that_cannot_be_read_or_replaced_means_the_full_model(tmp_path):
    out = io.StringIO()
    log.configure(stream=out)
    operations = botomodel.agent_operations()["ec2"]
    api_version = FULL.determine_latest_version("ec2", "service-2")
    # A directory where the file should be: neither readable as a model nor replaceable.
    (botomodel.data_dir(tmp_path, "ec2", operations) / "ec2" / api_version / "service-2.json").mkdir(parents=True)
    awsclients.use_trimmed_models(tmp_path)
    client = ec2.client("ec2", AwsConfig(), "us-east-1")
    assert "RunInstances" in client.meta.service_model.operation_names
    assert [w["service"] for w in _warnings(out)] == ["ec2"]
