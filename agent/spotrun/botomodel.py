"""Trimmed botocore service models: only the operations the agent calls (spotrun.iam.AGENT_CALLS).

EC2's full service model holds ~830 operations and ~4,400 shapes; loaded, it is the largest
single part of the idle agent's memory (~25 MB) though the agent calls fifteen operations.
botocore looks a model up along its loader's search path, first match wins, so a directory
holding ``<service>/<api-version>/service-2.json`` with only those operations and the shapes
they reach, put first on the session's path, is loaded instead of the full model, by botocore's
own code (serializers, parsers, endpoint rules, paginators: the rest still comes from botocore's
data, as the file names differ). The trimmed file is made from the installed botocore's own model
(read through its loader, so ``.json.gz`` and ``sdk-extras`` are handled as botocore does) on
first use and cached under a directory keyed by botocore's version and the operation list, so it
always matches both. Anything that goes wrong here means the full model, with a warning: a
smaller model is worth some memory, never the agent's run.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

MODEL = "service-2"


def agent_operations() -> dict[str, tuple[str, ...]]:
    """{botocore service name: operation names} from spotrun.iam.AGENT_CALLS (the IAM action
    prefixes of these services are their botocore names)."""
    from spotrun.iam import AGENT_CALLS

    operations: dict[str, set[str]] = {}
    for action, _why in AGENT_CALLS:
        service, operation = action.split(":", 1)
        operations.setdefault(service, set()).add(operation)
    return {service: tuple(sorted(ops)) for service, ops in operations.items()}


def shape_closure(model: dict, roots: Iterable[str]) -> set[str]:
    """Names of every shape reachable from ``roots`` (members, list members, map keys/values)."""
    shapes, seen, pending = model["shapes"], set(), list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        shape = shapes[name]  # a KeyError here means a model that refers to nothing
        refs = [m["shape"] for m in shape.get("members", {}).values()]
        refs += [shape[k]["shape"] for k in ("member", "key", "value") if k in shape]
        pending.extend(r for r in refs if r not in seen)
    return seen


def operation_roots(operation: dict) -> list[str]:
    """The shapes an operation names: its input, output and errors."""
    roots = [operation[k]["shape"] for k in ("input", "output") if k in operation]
    return roots + [e["shape"] for e in operation.get("errors", [])]


def trim(model: dict, operations: Iterable[str]) -> dict:
    """``model`` with only ``operations`` and the shapes they reach; each kept part is the
    original's own dict, unchanged. A name the model lacks raises KeyError naming it."""
    ops = {}
    for name in operations:
        if name not in model["operations"]:
            raise KeyError(f"operation {name!r} not in the {model['metadata'].get('serviceId')} model")
        ops[name] = model["operations"][name]
    keep = shape_closure(model, [root for op in ops.values() for root in operation_roots(op)])
    trimmed = {key: value for key, value in model.items() if key not in ("operations", "shapes")}
    trimmed["operations"] = ops
    trimmed["shapes"] = {name: model["shapes"][name] for name in sorted(keep)}
    return trimmed


def _complete(model: Any, operations: Iterable[str]) -> bool:
    """Whether a cached file is a whole model: every wanted operation, every shape it reaches."""
    try:
        wanted = [model["operations"][name] for name in operations]
        shape_closure(model, [root for op in wanted for root in operation_roots(op)])
        return bool(model["metadata"]["apiVersion"])
    except (KeyError, TypeError, AttributeError):
        return False


def _write_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def data_dir(cache_root: Path, service: str, operations: Iterable[str]) -> Path:
    """Keyed by botocore's version and the operation list: a new agent (more calls) or a new
    botocore (other shapes) never reads a model made for the other. One directory per service,
    so a service whose model cannot be made stays off the search path alone."""
    import botocore

    digest = hashlib.sha256("\n".join(sorted(operations)).encode()).hexdigest()[:12]
    return Path(cache_root) / f"botocore-{botocore.__version__}" / f"{service}-{digest}"


def ensure(service: str, operations: Iterable[str], cache_root: Path,
           search_paths: list[str]) -> Path:
    """The data directory holding ``service``'s trimmed model (made now if missing or
    incomplete), for a loader's search path. ``search_paths`` are where the full model is
    looked up (the session loader's own path, without trimmed directories). Raises on any
    failure; the caller falls back to the full model."""
    from botocore.loaders import Loader

    operations = tuple(operations)
    where = data_dir(cache_root, service, operations)
    source = Loader(extra_search_paths=list(search_paths), include_default_search_paths=False)
    api_version = source.determine_latest_version(service, MODEL)
    path = where / service / api_version / f"{MODEL}.json"
    if path.is_file():
        try:
            if _complete(json.loads(path.read_text()), operations):
                return where
        except (OSError, ValueError):
            pass  # unreadable or torn by hand: made again below
    _write_atomically(path, trim(source.load_service_model(service, MODEL, api_version), operations))
    del source  # its cache holds the full model
    # The full model is garbage now, some of it in reference cycles: collect it before the
    # process settles (measured ~5 MiB of the agent's resident memory on a first boot).
    gc.collect()
    return where
