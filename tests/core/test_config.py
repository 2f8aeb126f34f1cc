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
    ('[lease]\ntakeover_window_s = 0\n', "lease.takeover_window_s"),
    ('[lease]\ntakeover_window_s = -5.0\n', "lease.takeover_window_s"),
    ('[lease]\ntakeover_window_s = inf\n', "lease.takeover_window_s"),
    ('[lease]\ntakeover_window_s = nan\n', "lease.takeover_window_s"),
    ('[lease]\ntakeover_lookups = 0\n', "lease.takeover_lookups"),
    ('[lease]\ntakeover_lookups = 2.5\n', "lease.takeover_lookups"),
    ('[lease]\nloser_wait_s = 0.0\n', "lease.loser_wait_s"),
    ('[lease]\nloser_wait_s = inf\n', "lease.loser_wait_s"),
    ('[lease]\nloser_wait_s = 300\n', "lease.loser_wait_s"),  # systemd's start limit never comes
    ('[lease]\nloser_wiat_s = 30\n', "lease.loser_wiat_s"),
    ('[aws]\nsingle_instance = "yes"\n', "aws.single_instance"),
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


def test_lease_bounds_and_the_single_instance_promise_are_read():
    cfg = config.from_mapping({"aws": {"single_instance": True},
                               "lease": {"takeover_window_s": 120, "takeover_lookups": 3,
                                         "loser_wait_s": 100}})
    assert cfg.aws.single_instance is True and cfg.aws.lease_table == ""
    assert (cfg.lease.takeover_window_s, cfg.lease.takeover_lookups, cfg.lease.loser_wait_s) == \
        (120.0, 3, 100.0)
    defaults = config.load(None).lease
    assert (defaults.takeover_window_s, defaults.takeover_lookups, defaults.loser_wait_s) == \
        (300.0, 5, 90.0)


def test_an_agent_config_without_a_lease_table_is_refused_unless_promised():
    """Issue 21: what `agent run` loads (require_lease) must name the table, or promise one
    instance; the error names the field and says how to fix it."""
    with pytest.raises(ConfigError) as err:
        config.load(None, require_lease=True)
    assert err.value.key == "aws.lease_table"
    assert "spotrun init" in str(err.value) and "aws.single_instance = true" in str(err.value)
    assert config.load(None, ({"aws": {"single_instance": True}}, "user-data"),
                       require_lease=True).aws.single_instance
    assert config.load(None, ({"aws": {"lease_table": "t"}}, "user-data"),
                       require_lease=True).aws.lease_table == "t"


def test_to_mapping_round_trips():
    cfg = config.from_mapping({"job": {"id": "j1"}, "trainer": {"command": ["x", "y"]}})
    assert config.from_mapping(config.to_mapping(cfg)) == cfg


# -- a sweep's section (issue 19): what `spotrun launch` writes for the fleet's instances --

def _sweep(**sweep):
    return {"aws": {"lease_table": "t"}, "sweep": sweep}


def test_a_sweep_section_gives_each_experiment_its_own_job_command_and_env():
    cfg = config.from_mapping({**_sweep(id="grid", experiments=[
        {"job": "grid-a", "args": ["--lr", "0.1"], "env": {"WARMUP": "5"}}, {"job": "grid-b"}]),
        "trainer": {"command": ["python", "train.py"], "env": {"BASE": "1", "WARMUP": "0"}}})
    first, second = (cfg.for_experiment(e) for e in cfg.sweep.experiments)
    assert (first.job.id, first.trainer.command, dict(first.trainer.env)) == (
        "grid-a", ("python", "train.py", "--lr", "0.1"), {"BASE": "1", "WARMUP": "5"})
    assert (second.job.id, second.trainer.command) == ("grid-b", ("python", "train.py"))
    assert cfg.job.id == "default" and cfg.trainer.command == ("python", "train.py")  # unchanged
    assert first.sweep == cfg.sweep


@pytest.mark.parametrize("sweep, key", [
    ({"id": "grid"}, "sweep.experiments"),
    ({"experiments": [{"job": "grid-a"}]}, "sweep.id"),
    ({"id": "grid", "experiments": "grid-a"}, "sweep.experiments"),
    ({"id": "grid", "experiments": ["grid-a"]}, "sweep.experiments[0]"),
    ({"id": "grid", "experiments": [{"job": "grid a"}]}, "sweep.experiments[0].job"),
    ({"id": "grid", "experiments": [{"job": "grid-a", "lr": 1}]}, "sweep.experiments[0].lr"),
    ({"id": "grid", "experiments": [{"job": "grid-a", "args": "--lr 1"}]},
     "sweep.experiments[0].args"),
    ({"id": "grid", "experiments": [{"job": "grid-a", "env": {"A": 1}}]},
     "sweep.experiments[0].env"),
    ({"id": "grid", "experiments": [{"job": "grid-a"}, {"job": "grid-a"}]}, "sweep.experiments"),
    ({"id": "grid", "experiments": [{"job": f"g-{n}"} for n in range(101)]}, "sweep.experiments"),
    ({"id": "grid!", "experiments": [{"job": "grid-a"}]}, "sweep.id"),
    ({"id": "grid", "experiments": [], "extra": 1}, "sweep.extra"),
])
def test_a_bad_sweep_section_names_its_field(sweep, key):
    with pytest.raises(config.ConfigError) as err:
        config.from_mapping(_sweep(**sweep), "user-data")
    assert err.value.key == key and err.value.source == "user-data"


def test_a_sweep_needs_the_lease_table_even_with_single_instance(tmp_path):
    text = ('[code]\nrepository = "r"\n[aws]\nsingle_instance = true\n'
            '[sweep]\nid = "grid"\nexperiments = [{ job = "grid-a" }]\n')
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(tmp_path / "agent.toml", require_lease=True)
    assert err.value.key == "aws.lease_table" and "sweep" in str(err.value)
