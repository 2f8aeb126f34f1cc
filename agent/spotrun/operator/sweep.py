"""A sweep: one job file, N experiments, each one a job of its own (issue 19).

The ``[sweep]`` section lists experiments, or a grid that expands to that list::

    [[sweep.experiments]]          # either: named experiments
    name = "lr-high"
    args = ["--lr", "0.1"]         # appended to trainer.command
    env = { WARMUP = "5" }         # merged over trainer.env

    dataset_volume = "vol-..."     # optional: `spotrun init` snapshots it once; every
                                   # experiment's first volume is made from that snapshot

    [sweep.grid]                   # or: every combination of these values
    lr = [0.1, 0.01]
    batch_size = [64, 128]
    # pass_as = "args"             # `--lr 0.1` appended (default); "env": lr=0.1 in the environment

Each experiment becomes a job whose id is ``<job.id>-<name>`` (its tags, volume, checkpoints,
progress and completion record are its own). A grid experiment's name is built from its
values in the grid's order, e.g. ``lr0.1-batch_size64``. Everything is checked here, before
any AWS call; a ConfigError names the field (``sweep.experiments[2].name``, ``sweep.grid.lr``).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from spotrun.config import _JOB_ID, ConfigError

# A sweep is a handful to a few dozen runs; a grid that expands past this is almost always a
# typo (a list where a range was meant), and every experiment is a volume.
MAX_EXPERIMENTS = 100
PASS_AS = ("args", "env")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARAMETER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_VOLUME_ID = re.compile(r"^vol-[0-9a-f]{8,17}$")


@dataclass(frozen=True)
class Experiment:
    """One run of the sweep: its job id, and what it changes in the trainer's command line
    and environment. ``parameters`` are the grid values (or the experiment's env and args as
    written), for status and plots."""

    name: str
    job_id: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)


# The agent's choices (spotrun.claimpolicy.POLICIES), the default first.
CLAIM_POLICIES = ("zone-first", "in-order")


def expand(raw: Any, base_job_id: str, source: str = "job file") -> tuple[Experiment, ...]:
    """The experiments ``[sweep]`` describes, in order; ConfigError names the first bad field."""
    if not isinstance(raw, Mapping):
        raise ConfigError("sweep", "expected a table ([sweep] with experiments or a grid)", source)
    unknown = sorted(set(raw) - {"experiments", "grid", "pass_as", "claim", "dataset_volume"})
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}", "unknown key (known: claim, dataset_volume, "
                          "experiments, grid, pass_as)", source)
    dataset_volume(raw, source)
    if raw.get("claim", CLAIM_POLICIES[0]) not in CLAIM_POLICIES:
        raise ConfigError("sweep.claim", f"must be one of {', '.join(CLAIM_POLICIES)}, got "
                          f"{raw['claim']!r}", source)
    if ("experiments" in raw) == ("grid" in raw):
        raise ConfigError("sweep", "give either [[sweep.experiments]] or [sweep.grid], "
                          "exactly one of them", source)
    if "grid" in raw:
        experiments = _from_grid(raw["grid"], raw.get("pass_as", "args"), base_job_id, source)
    else:
        if "pass_as" in raw:
            raise ConfigError("sweep.pass_as", "applies to a grid only (an experiment says "
                              "args and env itself)", source)
        experiments = _from_list(raw["experiments"], base_job_id, source)
    return experiments


def dataset_volume(raw: Mapping[str, Any], source: str) -> str:
    """``sweep.dataset_volume``: the volume `spotrun init` snapshots once for every experiment
    (a filesystem with the datasets directory, prepared as the seed prepares its volume); ""
    when not given (each experiment's volume is then made empty)."""
    value = raw.get("dataset_volume", "")
    if not isinstance(value, str) or (value and not _VOLUME_ID.match(value)):
        raise ConfigError("sweep.dataset_volume", f"expected a volume id like vol-0abc1234, got "
                          f"{value!r}", source)
    return value


def _from_list(raw: Any, base_job_id: str, source: str) -> tuple[Experiment, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("sweep.experiments", "expected a non-empty list of tables "
                          "([[sweep.experiments]] with a name each)", source)
    _check_count("sweep.experiments", len(raw), source)
    seen: dict[str, int] = {}
    experiments = []
    for index, item in enumerate(raw):
        where = f"sweep.experiments[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(where, "expected a table with a name", source)
        unknown = sorted(set(item) - {"name", "args", "env"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", "unknown key (known: name, args, env)", source)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name", f"expected a name of letters, digits, '.', '_', '-' "
                              f"(starting with a letter or digit), got {name!r}", source)
        if name in seen:
            raise ConfigError(f"{where}.name", f"{name!r} is also the name of "
                              f"sweep.experiments[{seen[name]}]", source)
        seen[name] = index
        args = item.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}.args", f"expected a list of strings, got {args!r}", source)
        env = _env(item.get("env", {}), f"{where}.env", source)
        experiments.append(Experiment(
            name=name, job_id=_job_id(base_job_id, name, f"{where}.name", source),
            args=tuple(args), env=env, parameters={**({"args": " ".join(args)} if args else {}),
                                                   **env}))
    return tuple(experiments)


def _from_grid(raw: Any, pass_as: Any, base_job_id: str, source: str) -> tuple[Experiment, ...]:
    if pass_as not in PASS_AS:
        raise ConfigError("sweep.pass_as", f"must be one of {', '.join(PASS_AS)}, got {pass_as!r}",
                          source)
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("sweep.grid", "expected a table of parameter = [values, ...] "
                          "with at least one parameter", source)
    axes = []
    for key, values in raw.items():
        where = f"sweep.grid.{key}"
        pattern = _ENV_NAME if pass_as == "env" else _PARAMETER
        if not pattern.match(key):
            raise ConfigError(where, f"{key!r} cannot be passed as "
                              f"{'an environment variable' if pass_as == 'env' else 'an option'}",
                              source)
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"expected a non-empty list of values, got {values!r}", source)
        for value in values:
            if isinstance(value, (dict, list)) or not isinstance(value, (str, int, float, bool)):
                raise ConfigError(where, f"expected strings, numbers or booleans, got {value!r}",
                                  source)
        texts = [_text(v) for v in values]
        repeated = next((t for t in texts if texts.count(t) > 1), None)
        if repeated is not None:
            raise ConfigError(where, f"the value {repeated!r} is listed twice", source)
        axes.append((key, values))
    count = 1
    for _, values in axes:
        count *= len(values)
    _check_count("sweep.grid", count, source)
    experiments = []
    names: dict[str, dict] = {}
    for combination in itertools.product(*(values for _, values in axes)):
        parameters = {key: value for (key, _), value in zip(axes, combination)}
        name = "-".join(f"{key}{_NOT_IN_NAME.sub('_', _text(value))}"
                        for key, value in parameters.items())
        if name in names:
            raise ConfigError("sweep.grid", f"{parameters} and {names[name]} both make the "
                              f"experiment name {name!r}; change one of the values", source)
        names[name] = parameters
        if pass_as == "args":
            args = tuple(itertools.chain.from_iterable(
                (f"--{key}", _text(value)) for key, value in parameters.items()))
            env: dict[str, str] = {}
        else:
            args, env = (), {key: _text(value) for key, value in parameters.items()}
        experiments.append(Experiment(name=name, job_id=_job_id(base_job_id, name, "sweep.grid",
                                                                source),
                                      args=args, env=env, parameters=parameters))
    return tuple(experiments)


def _env(raw: Any, where: str, source: str) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a table of NAME = \"value\", got {raw!r}", source)
    for key, value in raw.items():
        if not _ENV_NAME.match(key):
            raise ConfigError(f"{where}.{key}", "is not an environment variable name", source)
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{key}", f"expected a string, got {value!r}", source)
    return dict(raw)


def _text(value: Any) -> str:
    """A grid value as the trainer sees it: TOML's spelling for booleans, the shortest exact
    spelling for numbers (repr), strings as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def _job_id(base: str, name: str, where: str, source: str) -> str:
    job_id = f"{base}-{name}"
    if not _JOB_ID.match(job_id):
        raise ConfigError(where, f"the experiment's job id {job_id!r} is longer than 63 "
                          "characters (job.id + '-' + name): shorten job.id or the name", source)
    return job_id


def _check_count(where: str, count: int, source: str) -> None:
    if count > MAX_EXPERIMENTS:
        raise ConfigError(where, f"expands to {count} experiments; at most {MAX_EXPERIMENTS} "
                          "(each one is a volume and a job)", source)
