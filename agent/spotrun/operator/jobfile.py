"""The job file: one TOML the operator writes, validated completely before any AWS call.

It is a superset of the agent's config (``spotrun.config``): the sections the agent knows
(``job``, ``code``, ``trainer``, ``volume``, ``aws``, ``agent``, ``metadata``) go, as written,
into the user-data stub; the ``[launch]`` section is the operator's only (image, instance
types, placement, price, fleet kind) and never leaves the laptop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from spotrun import config as agent_config
from spotrun.config import ConfigError
from spotrun.operator import sweep, validate
from spotrun.usersecrets import check_no_secrets

DEFAULT_JOB_FILE = "spotrun.toml"
FLEET_KINDS = ("ec2-fleet", "asg", "spot-fleet")
ALLOCATION_STRATEGIES = ("price-capacity-optimized", "capacity-optimized", "lowest-price",
                         "diversified", "capacity-optimized-prioritized")
DEFAULT_LEASE_TABLE = "spotrun-leases"

# family[generation][attributes].size, e.g. p3.2xlarge, g5.xlarge, trn1n.32xlarge, u-6tb1.metal
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*[0-9][a-z0-9-]*\.(nano|micro|small|medium|large|metal|"
                            r"[0-9]*xlarge|metal-[0-9]+xl)$")
_AZ = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SECURITY_GROUP = re.compile(r"^sg-[0-9a-f]{8,17}$")
_IMAGE = re.compile(r"^ami-[0-9a-f]{8,17}$")
_REGION = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$")


@dataclass(frozen=True)
class LaunchSpec:
    """The ``[launch]`` section: where and how to get capacity."""

    image_id: str = ""
    instance_types: tuple[str, ...] = ("p3.2xlarge", "p2.xlarge")
    # Where `init` creates the volume; "" = the first of availability_zones, else the region's first.
    volume_availability_zone: str = ""
    availability_zones: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    key_name: str = ""
    # USD per instance-hour; 0 = no cap beyond the on-demand price (AWS's default and advice).
    max_price: float = 0.0
    fleet: str = "ec2-fleet"
    allocation_strategy: str = "price-capacity-optimized"
    target_capacity: int = 1
    # Names; "" = derived from the job id (see Job.names).
    instance_role: str = ""
    launch_template: str = ""
    spot_fleet_role: str = "spotrun-spot-fleet"
    # Create and use the lease table (aws.lease_table, default spotrun-leases). False needs
    # aws.single_instance = true: the agent refuses to run without a table otherwise.
    lease_table: bool = True


_LAUNCH_FIELDS = {f.name: f for f in dataclasses.fields(LaunchSpec)}


@dataclass(frozen=True)
class Job:
    """A validated job file: the agent's config plus the launch section."""

    config: agent_config.Config
    launch: LaunchSpec
    # The agent-config sections exactly as the file wrote them (what the user data carries).
    agent_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "job file"
    # A sweep's experiments ([sweep], operator/sweep.py); () for a single job.
    experiments: tuple[sweep.Experiment, ...] = ()
    sweep_claim: str = sweep.CLAIM_POLICIES[0]  # [sweep] claim: how instances choose
    # [sweep] dataset_volume: init snapshots it once; launch writes that snapshot into the user
    # data as volume.source_snapshot (every experiment's first volume is made from it).
    dataset_volume: str = ""

    @property
    def id(self) -> str:
        return self.config.job.id

    @property
    def region(self) -> str:
        return self.config.aws.region

    @property
    def lease_table(self) -> str:
        if not self.launch.lease_table:
            return ""
        return self.config.aws.lease_table or DEFAULT_LEASE_TABLE

    @property
    def role_name(self) -> str:
        return self.launch.instance_role or bounded_name(f"spotrun-{self.id}", 64)

    @property
    def launch_template_name(self) -> str:
        return self.launch.launch_template or bounded_name(f"spotrun-{self.id}", 128)

    @property
    def group_name(self) -> str:
        return bounded_name(f"spotrun-{self.id}", 255)

    @property
    def volume_az(self) -> str:
        if self.launch.volume_availability_zone:
            return self.launch.volume_availability_zone
        if self.launch.availability_zones:
            return self.launch.availability_zones[0]
        return ""

    def user_data_overrides(self) -> dict[str, dict[str, Any]]:
        """What the agent needs: the file's agent sections, the job id and the lease table."""
        out = {section: dict(values) for section, values in self.agent_overrides.items()}
        out.setdefault("job", {})["id"] = self.id
        if self.lease_table:
            out.setdefault("aws", {})["lease_table"] = self.lease_table
        # The operator's region and endpoint are the laptop's view; the agent reads its own.
        for key in ("region", "endpoint_url"):
            out.get("aws", {}).pop(key, None)
        if out.get("aws") == {}:
            del out["aws"]
        if self.experiments:
            # Every instance of the fleet gets the whole list and claims one at a time
            # (agent/spotrun/sweeprun.py); args and env only where an experiment has them.
            out["sweep"] = {"id": self.id, "experiments": [
                {"job": e.job_id, **({"args": list(e.args)} if e.args else {}),
                 **({"env": dict(e.env)} if e.env else {})} for e in self.experiments]}
            if self.sweep_claim != sweep.CLAIM_POLICIES[0]:
                out["sweep"]["claim"] = self.sweep_claim
        return out


    def with_source_snapshot(self, snapshot_id: str) -> "Job":
        """The job as launch sends it once the sweep's dataset snapshot is found: the user data
        says ``[volume] source_snapshot``."""
        overrides = {section: dict(values) for section, values in self.agent_overrides.items()}
        overrides.setdefault("volume", {})["source_snapshot"] = snapshot_id
        config = agent_config.load(None, (overrides, self.source))
        return dataclasses.replace(self, config=config, agent_overrides=overrides)

    def experiment_job(self, experiment: sweep.Experiment) -> "Job":
        """The job one experiment of the sweep runs: its own id, the trainer's command with the
        experiment's args appended and its env merged over trainer.env; the rest as written."""
        overrides = {section: dict(values) for section, values in self.agent_overrides.items()}
        overrides.setdefault("job", {})["id"] = experiment.job_id
        trainer = overrides.setdefault("trainer", {})
        trainer["command"] = [*self.config.trainer.command, *experiment.args]
        env = {**self.config.trainer.env, **experiment.env}
        if env:
            trainer["env"] = env
        source = f"{self.source} [sweep: {experiment.name}]"
        config = agent_config.load(None, (overrides, source))
        return Job(config=config, launch=self.launch, agent_overrides=overrides, source=source)


def single_job_text(job: Job, note: str = "") -> str:
    """``job`` as a job file of its own (TOML): its agent sections as written and its launch
    section's non-default values; no sweep. What `spotrun plan --write-job-files` writes for
    each experiment, so that one can run on its own fleet today."""
    from spotrun.userdata import _dumps

    launch = {}
    for name, spec in _LAUNCH_FIELDS.items():
        value = getattr(job.launch, name)
        if value != spec.default and not (isinstance(value, tuple) and value == ()):
            launch[name] = list(value) if isinstance(value, tuple) else value
    sections = {section: dict(values) for section, values in job.agent_overrides.items()}
    header = "".join(f"# {line}\n" for line in note.splitlines())
    return header + _dumps({**sections, **({"launch": launch} if launch else {})})


def bounded_name(name: str, limit: int) -> str:
    """AWS name limits: keep the readable prefix, make the cut unique with a short hash."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:limit - 9]}-{digest}"


def _string_list(name: str, value: Any, pattern: re.Pattern | None, what: str, source: str) -> tuple:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, f"expected a list of strings, got {value!r}", source)
    for item in value:
        if pattern is not None and not pattern.match(item):
            raise ConfigError(name, f"{item!r} is not {what}", source)
    return tuple(value)


def _launch_spec(raw: Mapping[str, Any], source: str) -> LaunchSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError("launch", "expected a table", source)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"launch.{key}"
        if key not in _LAUNCH_FIELDS:
            raise ConfigError(name, f"unknown key (known: {', '.join(sorted(_LAUNCH_FIELDS))})", source)
        default = _LAUNCH_FIELDS[key].default
        if key == "instance_types":
            kwargs[key] = _string_list(name, value, _INSTANCE_TYPE,
                                       "an instance type like p3.2xlarge", source)
        elif key == "availability_zones":
            kwargs[key] = _string_list(name, value, _AZ, "an availability zone like us-west-2b", source)
        elif key == "subnets":
            kwargs[key] = _string_list(name, value, _SUBNET, "a subnet id like subnet-0abc1234", source)
        elif key == "security_group_ids":
            kwargs[key] = _string_list(name, value, _SECURITY_GROUP, "a security group id like sg-0abc1234",
                                       source)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(name, f"expected true or false, got {value!r}", source)
            kwargs[key] = value
        elif isinstance(default, int) and not isinstance(default, bool) and key == "target_capacity":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"expected a whole number of instances >= 1, got {value!r}", source)
            kwargs[key] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(name, f"expected a price in USD per hour, got {value!r}", source)
            if value < 0:
                raise ConfigError(name, f"must not be negative, got {value}", source)
            kwargs[key] = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(name, f"expected a string, got {value!r}", source)
            kwargs[key] = value
    spec = LaunchSpec(**kwargs)
    if not spec.instance_types:
        raise ConfigError("launch.instance_types", "must name at least one instance type", source)
    if spec.fleet not in FLEET_KINDS:
        raise ConfigError("launch.fleet", f"must be one of {', '.join(FLEET_KINDS)}, got {spec.fleet!r}",
                          source)
    if spec.allocation_strategy not in ALLOCATION_STRATEGIES:
        raise ConfigError("launch.allocation_strategy",
                          f"must be one of {', '.join(ALLOCATION_STRATEGIES)}, got {spec.allocation_strategy!r}",
                          source)
    if spec.image_id and not _IMAGE.match(spec.image_id):
        raise ConfigError("launch.image_id", f"{spec.image_id!r} is not an AMI id like ami-0abc1234", source)
    if spec.volume_availability_zone and not _AZ.match(spec.volume_availability_zone):
        raise ConfigError("launch.volume_availability_zone",
                          f"{spec.volume_availability_zone!r} is not an availability zone", source)
    return spec


def from_mapping(raw: Mapping[str, Any], source: str = "job file") -> Job:
    """Validate a parsed job file; ConfigError names the first bad field.

    The one validation path: every command loads the job through here before any AWS call."""
    raw = dict(raw)
    validate.check_finite(raw, source)
    check_no_secrets(raw, source)
    launch = _launch_spec(raw.pop("launch", {}), source)
    sweep_raw = raw.pop("sweep", None)
    config = agent_config.load(None, (raw, source))
    if not config.code.repository:
        raise ConfigError("code.repository", "is required: the git URL of the training code", source)
    if config.aws.region and not _REGION.match(config.aws.region):
        raise ConfigError("aws.region", f"{config.aws.region!r} is not a region like us-west-2", source)
    for key, zones in (("launch.availability_zones", launch.availability_zones),
                       ("launch.volume_availability_zone", (launch.volume_availability_zone,))):
        for zone in zones:
            if zone and config.aws.region and not zone.startswith(config.aws.region):
                raise ConfigError(key, f"{zone!r} is not in the job's region {config.aws.region}", source)
    if not launch.lease_table and not config.aws.single_instance:
        raise ConfigError("launch.lease_table", "false needs aws.single_instance = true: the agent "
                          "refuses to run without the lease table unless at most one instance "
                          "can ever run for the job (prefer the table)", source)
    if config.aws.single_instance and launch.target_capacity > 1:
        raise ConfigError("launch.target_capacity", f"{launch.target_capacity} instances cannot "
                          "keep aws.single_instance's promise of one", source)
    overrides = {section: dict(values) for section, values in raw.items()}
    job = Job(config=config, launch=launch, agent_overrides=overrides, source=source)
    validate.render_user_data(job)  # size and content of what launch will send, checked for init too
    if config.volume.source_snapshot:
        raise ConfigError("volume.source_snapshot", "is not for a job file: `spotrun launch` sets "
                          "it from sweep.dataset_volume (the dataset snapshot `spotrun init` "
                          "makes)", source)
    if sweep_raw is not None:
        claim = sweep_raw.get("claim", sweep.CLAIM_POLICIES[0]) if isinstance(sweep_raw, Mapping) \
            else sweep.CLAIM_POLICIES[0]
        job = dataclasses.replace(job, sweep_claim=claim)
        job = dataclasses.replace(job, experiments=_checked_sweep(job, sweep_raw))
        job = dataclasses.replace(job, dataset_volume=sweep.dataset_volume(sweep_raw, source))
    return job


def _checked_sweep(job: Job, raw: Any) -> tuple[sweep.Experiment, ...]:
    """The sweep's experiments, each one a valid job; the fleet fits the sweep."""
    experiments = sweep.expand(raw, job.id, job.source)
    if not job.lease_table or job.config.aws.single_instance:
        raise ConfigError("sweep", "needs the lease table (launch.lease_table = true, "
                          "aws.single_instance = false): it is where instances claim "
                          "experiments", job.source)
    if job.launch.target_capacity > len(experiments):
        raise ConfigError("launch.target_capacity", f"{job.launch.target_capacity} instances for "
                          f"{len(experiments)} experiments: at most one instance per experiment",
                          job.source)
    # What the fleet's instances get: the whole sweep in one stub (at most 16 KB), with the
    # longest dataset snapshot id launch may add.
    probe = dataclasses.replace(job, experiments=experiments)
    if sweep.dataset_volume(raw, job.source):
        probe = probe.with_source_snapshot("snap-" + "0" * 17)
    validate.render_user_data(probe)
    return experiments


def load(path: str | Path | None) -> Job:
    """Read and validate a job file (default: ./spotrun.toml)."""
    path = Path(path or DEFAULT_JOB_FILE)
    if not path.is_file():
        raise ConfigError("(file)", "no such job file; pass --job-file PATH", str(path))
    return from_mapping(agent_config.parse_toml(path.read_text(), str(path)), str(path))
