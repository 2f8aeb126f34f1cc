"""Suite-wide set-up and fixtures.

The trainer runs as an unprivileged user (nobody) in the tests, as it does on an instance:
that user must be able to reach the virtualenv's interpreter and the checkout. A clone made
under a private directory (mode 0700, e.g. a mkdtemp) would stop it with "permission denied";
grant search permission (o+x, never read) along the path, and say so.
"""
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Shared helpers (testkit: wait_until, the metadata emulator's instance): tests/ has no
# packages, so this folder goes on the path as tests/agent/helpers does for the agent's tests.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))


def _grant_traversal(path: Path) -> list[str]:
    changed = []
    for directory in [path, *path.parents]:
        if directory == Path("/"):
            continue
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXOTH)
            changed.append(str(directory))
    return changed


def pytest_configure(config):
    if os.geteuid() != 0:
        return
    interpreter = Path(sys.executable).resolve()
    changed = _grant_traversal(ROOT) + _grant_traversal(Path(sys.prefix)) + _grant_traversal(interpreter.parent)
    if changed:
        print(f"tests: granted o+x on {', '.join(changed)} so the unprivileged trainer can run",
              file=sys.stderr)


def pytest_sessionstart(session):
    """Under CI or SPOTRUN_REQUIRE_REAL=1 (make test), a machine without root, loop devices or
    the tools the tests drive fails the run here, naming what is missing (realguard)."""
    import realguard

    if realguard.required():
        parts = realguard.missing()
        if parts:
            pytest.exit(realguard.message(parts), returncode=pytest.ExitCode.TESTS_FAILED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI or SPOTRUN_REQUIRE_REAL=1, a skip for a missing part of the machine (a loop
    device that would not bind, a mount refused, ...) is a failure, not a green skip."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"spotrun_report_{report.when}", report)  # shared_tmp keeps a failed run's files
    if not report.skipped or getattr(report, "wasxfail", None) is not None:
        return
    import realguard

    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if realguard.required() and realguard.ENVIRONMENT_SKIP.search(reason or ""):
        report.outcome = "failed"
        report.longrepr = (f"{reason}\n(a skip for a missing part of the machine is a failure "
                           f"when the run must prove the real thing: CI or "
                           f"{realguard.REQUIRE_ENV}=1)")


# make test runs two pytest-xdist workers (--dist loadgroup). Everything that drives the
# machine itself -- loop devices, mounts, systemd in a container, the local cloud with its
# agents, timing-sensitive supervision -- stays in one group, so those tests still run one at
# a time, as they were written to; the trainer's, the operator CLI's and the local cloud's own
# unit tests (no block devices, no mounts) run beside them, a file per group so a module's
# fixtures are built once.
PARALLEL_DIRS = {"trainer", "operator", "localcloud", "bench"}
MACHINE_GROUP = "machine"


def xdist_group_of(item) -> str:
    path = Path(str(item.fspath)).resolve()
    try:
        top = path.relative_to(ROOT / "tests").parts[0]
    except ValueError:
        return MACHINE_GROUP
    if top in PARALLEL_DIRS and not any(item.get_closest_marker(m) for m in ("loopdev", "system")):
        return str(path.relative_to(ROOT))
    return MACHINE_GROUP


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group_of(item)))


@pytest.fixture(autouse=True)
def _default_logging():
    """No test leaves a logging level or a captured stream behind for the next one."""
    yield
    from spotrun import log

    log.configure()


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's real server on loopback (the AWS API of the tests), one per test module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def shared_tmp(request):
    """A temporary directory the unprivileged training user can traverse (pytest's are 0700).
    Kept when the test fails (its path is printed): a run's logs and volume images are the
    evidence of what went wrong, and a rare failure may not come back."""
    path = Path(tempfile.mkdtemp(prefix="spotrun-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        call = getattr(request.node, "spotrun_report_call", None)
        if call is not None and call.failed:
            print(f"\nthe failed test's files are kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def metadata_server():
    """Factory: ``metadata_server(require_token=True, clock=None, hold=None, **metadata)`` -> a
    started ``spotrun.localcloud.imds.MetadataServer`` on loopback for
    ``testkit.instance_metadata(**metadata)``. ``hold``: a :class:`testkit.HeldPaths` whose
    paths' GETs wait until it is released. Every one released and stopped afterwards."""
    from spotrun.localcloud.imds import MetadataServer
    from testkit import HoldingMetadataServer, instance_metadata

    servers: list[MetadataServer] = []

    def start(require_token: bool = True, clock=None, hold=None, **metadata) -> MetadataServer:
        kwargs = {"clock": clock} if clock is not None else {}
        md = instance_metadata(**metadata)
        if hold is None:
            server = MetadataServer(md, "127.0.0.1", 0, require_token=require_token, **kwargs)
        else:
            server = HoldingMetadataServer(md, "127.0.0.1", 0, require_token=require_token,
                                           held=hold, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            if isinstance(server, HoldingMetadataServer):
                server.held.release()  # a failed test may have left reads held
            server.stop()


@pytest.fixture
def imds(metadata_server):
    """The local cloud's metadata emulator for the tests' instance, started (see
    ``metadata_server`` for other instances and options)."""
    return metadata_server()


@pytest.fixture
def metadata_client(request):
    """Factory: ``metadata_client(server=None, **options)`` -> the agent's
    ``spotrun.imds.MetadataClient`` for ``server`` (by default the ``imds`` fixture's)."""
    from spotrun.imds import MetadataClient

    def make(server=None, **options) -> MetadataClient:
        server = server if server is not None else request.getfixturevalue("imds")
        return MetadataClient(server.endpoint, **options)

    return make
