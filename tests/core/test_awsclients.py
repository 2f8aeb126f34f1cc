"""One botocore session per process: clients are made once and the single-attempt twin
shares the session (and so the loaded EC2 model) instead of loading a second copy."""
from spotrun import awsclients, ec2
from spotrun.config import AwsConfig


def test_clients_are_made_once_per_settings_from_one_session(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    aws = AwsConfig()
    first = ec2.client("ec2", aws, "us-east-1")
    assert ec2.client("ec2", aws, "us-east-1") is first
    once = ec2.single_attempt(first, aws)
    assert once is not first and once.meta.config.retries["total_max_attempts"] == 1
    assert first.meta.config.retries["total_max_attempts"] == aws.max_attempts
    # The same session made both: its loader holds one EC2 model, loaded once.
    loader = awsclients._session.get_component("data_loader")
    models = [k for k in loader._cache if k[:3] == ("load_service_model", "ec2", "service-2")]
    assert len(models) == 1, models
    assert once.meta.service_model._service_description is first.meta.service_model._service_description
