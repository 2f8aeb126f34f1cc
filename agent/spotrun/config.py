"""The agent's configuration: TOML at /etc/spotrun/agent.toml, overridden by user data.

Every key has a default (the seed's choices where it made one). Validation is strict:
an unknown key, a wrong type or an out-of-range value stops the agent with a
ConfigError naming the key (``trainer.max_restarts``) and the file it came from,
before anything is touched.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Ubuntu 22.04's Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/spotrun/agent.toml")


class ConfigError(ValueError):
    """A configuration problem, with the key and the source it came from."""

    def __init__(self, key: str, message: str, source: str = "config"):
        self.key = key
        self.source = source
        super().__init__(f"{source}: {key}: {message}")


@dataclass(frozen=True)
class JobConfig:
    id: str = "default"


@dataclass(frozen=True)
class VolumeConfig:
    name_tag: str = "DL-datasets-checkpoints"
    size_gib: int = 100
    type: str = "gp3"
    iops: int = 0  # 0 = the type's default
    throughput: int = 0  # MiB/s, gp3 only; 0 = default
    encrypted: bool = True
    kms_key_id: str = ""
    # First boot of a job with no volume: create one (True) or stop with a clear error.
    create_if_missing: bool = True
    # "" = that first volume is made empty (the agent formats it). A snapshot id: it is made
    # from this snapshot (a sweep's dataset snapshot, `spotrun launch` writes it), in the
    # instance's AZ; the snapshot must hold an ext4 filesystem (the datasets directory).
    source_snapshot: str = ""
    mount_point: str = "/dltraining"
    datasets_dir: str = "datasets"
    checkpoints_dir: str = "checkpoints"
    # Where block devices appear by id (Nitro: nvme-Amazon_Elastic_Block_Store_vol...).
    device_dir: str = "/dev/disk/by-id"
    mount_options: str = "noatime"
    snapshot_on_drain: bool = True
    # Days to keep a migration snapshot once the migrated volume is verified (0 = delete then).
    snapshot_retention_days: float = 0.0
    attach_timeout_s: float = 300.0
    device_timeout_s: float = 120.0
    create_timeout_s: float = 900.0
    snapshot_timeout_s: float = 14400.0


@dataclass(frozen=True)
class CodeConfig:
    repository: str = ""
    ref: str = "main"
    workspace: str = "/var/lib/spotrun/workspace"
    # Credentials are read at run time, never from user data: a file on the AMI,
    # or an SSM parameter / Secrets Manager secret the instance role may read.
    credentials_file: str = ""
    credentials_ssm_parameter: str = ""
    credentials_secret_id: str = ""


@dataclass(frozen=True)
class TrainerConfig:
    command: tuple[str, ...] = ("python", "train.py")
    user: str = "ubuntu"
    # Directories prepended to PATH, e.g. the AMI's conda env bin directory.
    path_prepend: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""  # relative to the checkout; "" = its root
    max_restarts: int = 3
    restart_backoff_s: float = 10.0
    restart_backoff_max_s: float = 300.0
    # What a crash loop does after max_restarts: "cancel" the fleet (keeping the
    # volume and checkpoints) so it stops billing, or "keep-running".
    failure_policy: str = "cancel"
    # Does the trainer speak the completion protocol (docs/internals.md)? "auto": its hello
    # says so; "spotrun": it does even without a hello; "none": never SIGUSR1, exit 0 = done.
    protocol: str = "auto"
    # Seconds of the two-minute notice kept for unmount/snapshot/detach after the trainer stops.
    drain_reserve_s: float = 30.0
    # Put on the trainer's PYTHONPATH when it exists, so a script run by the AMI's own Python
    # (a conda env) can `import spotrun_trainer`; the .deb installs the library alone there.
    library_path: str = "/usr/lib/spotrun/trainer-lib"


@dataclass(frozen=True)
class MetadataConfig:
    endpoint: str = "http://169.254.169.254"
    allow_imdsv1: bool = False
    token_ttl_s: int = 21600
    # Seconds between reads of each path, each on its own schedule (spotrun.monitor): the
    # spot notice often (it bounds notice → drain), a rebalance recommendation and scheduled
    # maintenance (announced days ahead) less often; 4.7 requests a second in all by default.
    notice_poll_interval_s: float = 0.25
    poll_interval_s: float = 2.0
    maintenance_poll_interval_s: float = 5.0
    connect_timeout_s: float = 1.0
    read_timeout_s: float = 2.0
    deadline_s: float = 120.0


@dataclass(frozen=True)
class AwsConfig:
    region: str = ""  # "" = from instance identity
    endpoint_url: str = ""  # "" = AWS; the local spot cloud sets its own
    # The DynamoDB lease table (`spotrun init` creates "spotrun-leases"). Required by
    # `agent run`: without it two instances of the job can both use its volume.
    lease_table: str = ""
    # The operator's promise that at most one instance can ever run for this job: the only
    # thing it changes is that the agent may run without a lease table.
    single_instance: bool = False
    retry_mode: str = "adaptive"
    max_attempts: int = 10
    # How long EC2 may take to show a volume or snapshot it just created (it answers "not
    # found" meanwhile): this agent's own new resources are called gone only after that.
    consistency_window_s: float = 120.0


@dataclass(frozen=True)
class LeaseConfig:
    """The lease's bounds (``spotrun.lease`` reads its defaults from here)."""
    # A holder EC2 answers "not found" for is proven gone only after this long and this many
    # lookups, all not found: a just-launched instance can be unknown to EC2 for a while.
    takeover_window_s: float = 300.0
    takeover_lookups: int = 5
    # How long an instance waits for a holder that keeps the job without draining, before it
    # exits 1. At most MAX_LOSER_WAIT_S: with the unit's RestartSec=10, a longer wait keeps
    # systemd from ever reaching its start limit (5 starts in 600 s), and the loser retries
    # for as long as the instance runs.
    loser_wait_s: float = 90.0


MAX_LOSER_WAIT_S = 100.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = "/var/lib/spotrun"
    log_level: str = "info"
    # Seconds a `systemctl stop` (or shutdown) may take to drain; keep it below the unit's
    # TimeoutStopSec so systemd never SIGKILLs a drain half-way.
    stop_budget_s: float = 100.0
    # Scheduled maintenance is drained this long before its NotBefore (like a 2-minute notice).
    maintenance_lead_s: float = 120.0
    # How often training progress goes on the volume's tags (what `spotrun status` reads):
    # one CreateTags per interval, so not much more often than a minute on AWS.
    progress_tag_interval_s: float = 60.0
    # How often the trainer's latest metrics (loss, accuracy, ...) go to CloudWatch, namespace
    # "spotrun", dimension job (spotrun.metrics): the learning curves. 0 = never.
    metrics_interval_s: float = 60.0


@dataclass(frozen=True)
class SweepExperiment:
    """One experiment of a sweep as the agent runs it: its job id, and what it adds to the
    trainer's command line and environment."""
    job: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep (issue 19; `spotrun launch` writes it from the job file's ``[sweep]``): every
    instance of the fleet claims one experiment at a time through the lease table. ``id``
    "" = no sweep: the instance runs the one job of ``[job]``."""
    id: str = ""
    experiments: tuple[SweepExperiment, ...] = ()
    # Which free experiment an instance takes (spotrun.claimpolicy): "zone-first" (its volume
    # in this instance's zone, then one never started, then a migration) or "in-order".
    claim: str = "zone-first"


MAX_SWEEP_EXPERIMENTS = 100


@dataclass(frozen=True)
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    code: CodeConfig = field(default_factory=CodeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def for_experiment(self, experiment: SweepExperiment) -> "Config":
        """The config one experiment runs with: its job id, the trainer's command with the
        experiment's args appended, its env merged over the trainer's."""
        trainer = dataclasses.replace(self.trainer, command=(*self.trainer.command, *experiment.args),
                                      env={**self.trainer.env, **experiment.env})
        return dataclasses.replace(self, job=JobConfig(id=experiment.job), trainer=trainer)

    @property
    def mount_point(self) -> Path:
        return Path(self.volume.mount_point)

    @property
    def datasets_path(self) -> Path:
        return self.mount_point / self.volume.datasets_dir

    @property
    def checkpoints_path(self) -> Path:
        return self.mount_point / self.volume.checkpoints_dir

    @property
    def state_path(self) -> Path:
        return Path(self.agent.state_dir)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "job": JobConfig,
    "volume": VolumeConfig,
    "code": CodeConfig,
    "trainer": TrainerConfig,
    "metadata": MetadataConfig,
    "aws": AwsConfig,
    "lease": LeaseConfig,
    "agent": AgentConfig,
    "sweep": SweepConfig,
}

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{8,17}$")
_CHOICES = {
    ("trainer", "failure_policy"): ("cancel", "keep-running"),
    ("trainer", "protocol"): ("auto", "spotrun", "none"),
    ("volume", "type"): ("gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"),
    ("aws", "retry_mode"): ("standard", "adaptive"),
    ("agent", "log_level"): ("debug", "info", "warning", "error"),
    ("sweep", "claim"): ("zone-first", "in-order"),
}
_POSITIVE = {
    ("volume", "size_gib"), ("metadata", "poll_interval_s"), ("metadata", "notice_poll_interval_s"),
    ("metadata", "maintenance_poll_interval_s"), ("metadata", "connect_timeout_s"),
    ("metadata", "read_timeout_s"), ("metadata", "deadline_s"), ("aws", "max_attempts"),
    ("volume", "attach_timeout_s"), ("volume", "device_timeout_s"),
    ("volume", "create_timeout_s"), ("volume", "snapshot_timeout_s"),
    ("lease", "takeover_window_s"), ("lease", "takeover_lookups"), ("lease", "loser_wait_s"),
    ("agent", "progress_tag_interval_s"),
}
# Numbers that must be finite (TOML reads `inf` and `nan`): a bound that never ends is none.
_FINITE = {("lease", "takeover_window_s"), ("lease", "loser_wait_s")}


def _coerce(section: str, key: str, value: Any, default: Any, source: str) -> Any:
    name = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}", source)
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}", source)
        if value < 0:
            raise ConfigError(name, f"must not be negative, got {value}", source)
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}", source)
        if value < 0:
            raise ConfigError(name, f"must not be negative, got {value}", source)
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}", source)
        return value
    if isinstance(default, tuple):
        if isinstance(value, str) and key == "command":
            raise ConfigError(name, "expected a list of arguments, e.g. [\"python\", \"train.py\"]", source)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, f"expected a list of strings, got {value!r}", source)
        return tuple(value)
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(name, f"expected a table of string values, got {value!r}", source)
        return dict(value)
    raise AssertionError(f"unhandled default type for {name}")  # pragma: no cover


def _merge(base: dict, override: Mapping, source: str) -> dict:
    merged = copy.deepcopy(base)
    for section, values in override.items():
        if section not in _SECTIONS:
            raise ConfigError(section, f"unknown section (known: {', '.join(_SECTIONS)})", source)
        if not isinstance(values, Mapping):
            raise ConfigError(section, "expected a table", source)
        merged.setdefault(section, {})
        for key, value in values.items():
            merged[section][key] = (value, source)
    return merged


def _build(raw: dict) -> Config:
    sections = {}
    for section, cls in _SECTION_CLASSES.items():
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, (value, source) in raw.get(section, {}).items():
            if key not in known:
                raise ConfigError(
                    f"{section}.{key}", f"unknown key (known: {', '.join(sorted(known))})", source
                )
            if (section, key) == ("sweep", "experiments"):
                kwargs[key] = _experiments(value, source)
                continue
            kwargs[key] = _coerce(section, key, value, getattr(defaults, key), source)
            if (section, key) in _CHOICES and kwargs[key] not in _CHOICES[(section, key)]:
                raise ConfigError(
                    f"{section}.{key}",
                    f"must be one of {', '.join(_CHOICES[(section, key)])}, got {kwargs[key]!r}",
                    source,
                )
            if (section, key) in _FINITE and not math.isfinite(kwargs[key]):
                raise ConfigError(f"{section}.{key}", f"must be a finite number, got {kwargs[key]}",
                                  source)
            if (section, key) in _POSITIVE and kwargs[key] == 0:
                raise ConfigError(f"{section}.{key}", "must be greater than zero", source)
        sections[section] = cls(**kwargs)
    config = Config(**sections)
    _check_whole(config, raw)
    return config


def _experiments(value: Any, source: str) -> tuple[SweepExperiment, ...]:
    """``sweep.experiments``: a list of tables {job, args, env}, each checked by name."""
    if not isinstance(value, list):
        raise ConfigError("sweep.experiments", f"expected a list of tables, got {value!r}", source)
    if len(value) > MAX_SWEEP_EXPERIMENTS:
        raise ConfigError("sweep.experiments", f"{len(value)} experiments; at most "
                          f"{MAX_SWEEP_EXPERIMENTS}", source)
    found = []
    for index, entry in enumerate(value):
        name = f"sweep.experiments[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(name, f"expected a table {{job, args, env}}, got {entry!r}", source)
        unknown = sorted(set(entry) - {"job", "args", "env"})
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}", "unknown key (known: args, env, job)", source)
        job = entry.get("job")
        if not isinstance(job, str) or not _JOB_ID.match(job):
            raise ConfigError(f"{name}.job", f"{job!r} is not a valid job id (letters, digits, "
                              "'.', '_', '-'; at most 63)", source)
        args = _coerce("sweep", f"experiments[{index}].args", entry.get("args", []), (), source)
        env = _coerce("sweep", f"experiments[{index}].env", entry.get("env", {}), {}, source)
        found.append(SweepExperiment(job=job, args=args, env=env))
    jobs = [e.job for e in found]
    for job in jobs:
        if jobs.count(job) > 1:
            raise ConfigError("sweep.experiments", f"job {job!r} is listed twice", source)
    return tuple(found)


def _source_of(raw: dict, section: str, key: str) -> str:
    return raw.get(section, {}).get(key, (None, "defaults"))[1]


def _check_whole(config: Config, raw: dict) -> None:
    if not _JOB_ID.match(config.job.id):
        raise ConfigError(
            "job.id",
            f"{config.job.id!r} is not a valid job id (letters, digits, '.', '_', '-'; at most 63)",
            _source_of(raw, "job", "id"),
        )
    if not config.trainer.command:
        raise ConfigError("trainer.command", "must not be empty", _source_of(raw, "trainer", "command"))
    if config.volume.source_snapshot and not SNAPSHOT_ID.match(config.volume.source_snapshot):
        raise ConfigError("volume.source_snapshot", f"{config.volume.source_snapshot!r} is not a "
                          "snapshot id like snap-0abc1234", _source_of(raw, "volume", "source_snapshot"))
    if not config.volume.mount_point.startswith("/"):
        raise ConfigError("volume.mount_point", "must be an absolute path", _source_of(raw, "volume", "mount_point"))
    if not config.metadata.endpoint.startswith(("http://", "https://")):
        raise ConfigError("metadata.endpoint", "must be an http:// URL", _source_of(raw, "metadata", "endpoint"))
    if not 1 <= config.metadata.token_ttl_s <= 21600:
        raise ConfigError("metadata.token_ttl_s", "must be between 1 and 21600 seconds",
                          _source_of(raw, "metadata", "token_ttl_s"))
    for key in ("datasets_dir", "checkpoints_dir"):
        value = getattr(config.volume, key)
        if not value or value.startswith("/") or ".." in Path(value).parts:
            raise ConfigError(f"volume.{key}", "must be a relative path inside the volume",
                              _source_of(raw, "volume", key))
    if bool(config.sweep.id) != bool(config.sweep.experiments):
        key = "sweep.experiments" if config.sweep.id else "sweep.id"
        raise ConfigError(key, "a sweep needs both its id and its experiments",
                          _source_of(raw, "sweep", "id" if config.sweep.id else "experiments"))
    if config.sweep.id and not _JOB_ID.match(config.sweep.id):
        raise ConfigError("sweep.id", f"{config.sweep.id!r} is not a valid job id",
                          _source_of(raw, "sweep", "id"))
    if config.lease.loser_wait_s > MAX_LOSER_WAIT_S:
        raise ConfigError(
            "lease.loser_wait_s",
            f"must be at most {MAX_LOSER_WAIT_S:.0f} s, got {config.lease.loser_wait_s}: with the "
            "unit's RestartSec=10 a longer wait never lets systemd reach its start limit "
            "(5 starts in 600 s), so an instance that cannot win would retry for as long as it runs",
            _source_of(raw, "lease", "loser_wait_s"))


LEASE_REQUIRED = (
    "is required: the DynamoDB lease table that lets only one instance at a time use the job's "
    "volume ('spotrun init' creates \"spotrun-leases\"; without a table two instances booting "
    "together can both train on two copies, and one can delete the other's newest copy). Set "
    "aws.single_instance = true instead only when at most one instance can ever run for this "
    "job: capacity 1 AND no replacement can boot while the old instance still drains, which "
    "AWS does not guarantee for a fleet or Auto Scaling group")


def check_lease(config: Config, source: str = "config") -> None:
    """The agent's run needs the lease table unless the operator promised a single instance
    (invariant 1 cannot hold otherwise)."""
    if not config.aws.lease_table and not config.aws.single_instance:
        raise ConfigError("aws.lease_table", LEASE_REQUIRED, source)
    if config.sweep.id and not config.aws.lease_table:
        raise ConfigError("aws.lease_table", "is required for a sweep: it is where the fleet's "
                          "instances claim experiments (aws.single_instance does not replace it)",
                          source)


def parse_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(syntax)", f"not valid TOML: {exc}", source) from None


def load(
    path: Path | str | None = DEFAULT_CONFIG_PATH,
    *overrides: tuple[Mapping, str],
    require_repository: bool = False,
    require_lease: bool = False,
) -> Config:
    """Defaults ← the config file (if it exists) ← each (mapping, source) override in order.

    ``require_repository`` and ``require_lease``: what `agent run` needs of the whole config
    (the file alone may leave them to the user data)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.exists():
            raw = _merge(raw, parse_toml(path.read_text(), str(path)), str(path))
    for mapping, source in overrides:
        raw = _merge(raw, mapping, source)
    config = _build(raw)
    if require_repository and not config.code.repository:
        raise ConfigError("code.repository", "is required: where the training code lives (a git URL)",
                          _source_of(raw, "code", "repository"))
    if require_lease:
        where = [str(path)] if path is not None and path.exists() else []
        check_lease(config, " + ".join(where + [source for _, source in overrides]) or "config")
    return config


def from_mapping(mapping: Mapping, source: str = "config") -> Config:
    return _build(_merge({}, mapping, source))


def to_mapping(config: Config) -> dict:
    """The config as plain TOML-able data (tuples as lists), e.g. to write a user-data stub."""
    out = {}
    for section in _SECTION_CLASSES:
        values = dataclasses.asdict(getattr(config, section))
        out[section] = {k: _plain(v) for k, v in values.items()}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
