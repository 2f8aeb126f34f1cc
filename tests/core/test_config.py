import pytest

from spotrun import config
from spotrun.config import ConfigError


def test_defaults_follow_the_seed():
    cfg = config.load(None)
    assert cfg.volume.name_tag == "DL-datasets-checkpoints"
    assert str(cfg.mount_point) == "/dltraining"
    assert str(cfg.datasets_path) == "/dltraining/datasets"
    assert str(cfg.checkpoints_path) == "/dltraining/checkpoints"
    assert cfg.trainer.user == "ubuntu"
    assert cfg.metadata.allow_imdsv1 is False


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[job]\nid = "resnet"\n[trainer]\nmax_restarts = 5\ncommand = ["python", "a.py"]\n')
    cfg = config.load(path, ({"trainer": {"max_restarts": 7}}, "user-data"))
    assert cfg.job.id == "resnet"
    assert cfg.trainer.max_restarts == 7
    assert cfg.trainer.command == ("python", "a.py")


@pytest.mark.parametrize("text, key", [
    ('[trainer]\nmax_restartz = 1\n', "trainer.max_restartz"),
    ('[volume]\nsize_gib = "big"\n', "volume.size_gib"),
    ('[volume]\nsize_gib = 0\n', "volume.size_gib"),
    ('[trainer]\ncommand = "python train.py"\n', "trainer.command"),
    ('[trainer]\nfailure_policy = "explode"\n', "trainer.failure_policy"),
    ('[metadata]\nendpoint = "169.254.169.254"\n', "metadata.endpoint"),
    ('[metadata]\ntoken_ttl_s = 21601\n', "metadata.token_ttl_s"),
    ('[volume]\ncheckpoints_dir = "../etc"\n', "volume.checkpoints_dir"),
    ('[job]\nid = "has space"\n', "job.id"),
    ('[nonsense]\nx = 1\n', "nonsense"),
    ('[volume]\nencrypted = "yes"\n', "volume.encrypted"),
    ('[trainer]\nenv = {A = 1}\n', "trainer.env"),
    ('not toml at all [', "(syntax)"),
])
def test_bad_config_names_the_key_and_the_file(tmp_path, text, key):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert err.value.key == key
    assert str(path) in str(err.value)


def test_missing_repository_is_named_when_required():
    with pytest.raises(ConfigError) as err:
        config.load(None, require_repository=True)
    assert err.value.key == "code.repository"


def test_to_mapping_round_trips():
    cfg = config.from_mapping({"job": {"id": "j1"}, "trainer": {"command": ["x", "y"]}})
    assert config.from_mapping(config.to_mapping(cfg)) == cfg
