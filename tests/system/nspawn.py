"""A Debian 12 system (or another Distribution) booted with systemd-nspawn, driven from the
host with nsenter.

The root filesystem is made once by debootstrap and cached under /var/cache/spotrun
(keyed by the distribution's recipe, so changing the package list rebuilds it); every
container boots a fresh copy of it, so tests never see each other's leftovers.

These machines run no systemd as PID 1 on the host, so nspawn cannot register the
container with machined (--register=no) nor create a scope unit (--keep-unit): without
a machine name known to the host, `machinectl shell` and `systemd-run -M` are not
available, and commands enter the container's namespaces with `nsenter -t <its PID 1>`.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("SPOTRUN_SYSTEM_CACHE", "/var/cache/spotrun"))
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Besides minbase: systemd as PID 1, what the package depends on (python3, e2fsprogs, git,
# mount: packaging/debian/control; so installing it needs no download), and the tools the
# tests inspect the system with.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "e2fsprogs", "util-linux", "mount",
            "git", "ca-certificates", "procps")


def host_debian_mirror() -> str:
    """The Debian mirror the host's apt uses (its deb822 or one-line sources): the roots come
    from the same place as the host's own packages, named nowhere in this repository."""
    entries = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        entries += re.findall(r"^URIs:\s*(\S+)", Path(path).read_text(), re.M)
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if Path(path).exists():
            entries += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", Path(path).read_text(), re.M)
    mirrors = [uri.rstrip("/") for uri in entries if uri.rstrip("/").endswith("/debian")]
    if not mirrors:
        raise ContainerError("no Debian mirror (a URI ending in /debian) in the host's apt sources")
    return mirrors[0]


@dataclass(frozen=True)
class Distribution:
    """How a root file system is made: ``debootstrap --variant=minbase`` of ``suite`` from
    ``mirror``, with ``packages``. Each is cached under its own key (its recipe)."""
    name: str              # the cache directory's prefix: debian12, debian13
    suite: str
    mirror: str
    packages: tuple[str, ...] = PACKAGES
    python: str = ""       # its python3's version, "3.13"

    @property
    def recipe(self) -> str:
        # Debian 12's reads exactly as it did before other distributions came: same cache key.
        return (f"debootstrap --variant=minbase {self.suite} {self.mirror} "
                f"+{','.join(self.packages)} v1")


DEBIAN12 = Distribution("debian12", "bookworm", host_debian_mirror(), python="3.11")
DEBIAN13 = Distribution("debian13", "trixie", host_debian_mirror(), python="3.13")
# Kept for the tests that name the default's recipe.
SUITE, MIRROR, RECIPE = DEBIAN12.suite, DEBIAN12.mirror, DEBIAN12.recipe


class ContainerError(RuntimeError):
    pass


def rootfs_cache(distribution: Distribution = DEBIAN12) -> Path:
    """The cached root of ``distribution``, made by debootstrap on first use (minutes)."""
    recipe = distribution.recipe
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    root = CACHE_DIR / f"{distribution.name}-rootfs-{key}"
    if (root / ".spotrun-rootfs-complete").exists():
        return root
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    lock_name = ".rootfs.lock" if distribution == DEBIAN12 else f".rootfs-{distribution.name}.lock"
    with open(CACHE_DIR / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be making it right now
        if (root / ".spotrun-rootfs-complete").exists():
            return root
        partial = Path(tempfile.mkdtemp(prefix="rootfs-partial-", dir=CACHE_DIR))
        partial.chmod(0o755)  # it becomes "/": mkdtemp's 0700 locks out every other user
        try:
            if distribution == DEBIAN12:
                apt_cache = ["--cache-dir=/var/cache/apt/archives"] if Path(
                    "/var/cache/apt/archives").is_dir() else []
            else:  # not the host's: another distribution's .debs may share a file name
                debs = CACHE_DIR / f"debs-{distribution.name}"
                debs.mkdir(exist_ok=True)
                apt_cache = [f"--cache-dir={debs}"]
            options = [*apt_cache, f"--include={','.join(distribution.packages)}"]
            subprocess.run(
                ["debootstrap", "--variant=minbase", *options, distribution.suite, str(partial),
                 distribution.mirror],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1500)
            subprocess.run(["chroot", str(partial), "apt-get", "clean"], check=True, timeout=120)
            # DLAMIs run the trainer as "ubuntu"; the container has that user too.
            subprocess.run(["chroot", str(partial), "useradd", "--create-home", "--shell",
                            "/bin/bash", "ubuntu"], check=True, timeout=60)
            (partial / "etc/hostname").write_text("spotrun-test\n")
            (partial / ".spotrun-rootfs-complete").write_text(recipe + "\n")
            if root.exists():
                shutil.rmtree(root)
            partial.rename(root)
        except subprocess.CalledProcessError as exc:
            raise ContainerError(f"debootstrap of {distribution.suite} failed: "
                                 f"{exc.stderr!r}") from exc
        finally:
            if partial.exists():
                _unmount_under(partial)  # a failed debootstrap can leave /proc, /sys mounted
                shutil.rmtree(partial, ignore_errors=True)
    return root


def _unmount_under(directory: Path) -> None:
    prefix = str(directory.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", target], check=False)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Container:
    """A booted copy of the cached root. Use as a context manager: it always powers off."""

    def __init__(self, workdir: Path, binds: list[str] = (), bind_loop_devices: bool = True,
                 distribution: Distribution = DEBIAN12):
        self.distribution = distribution
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.name = f"spotrun-test-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.binds = list(binds)
        self.bind_loop_devices = bind_loop_devices
        self.console_log = self.workdir / "console.log"
        self._nspawn: subprocess.Popen | None = None
        self.leader: int | None = None
        self.boot_state = ""

    # -- life cycle -------------------------------------------------------------------
    def boot(self, timeout: float = 120.0) -> "Container":
        subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs_cache(self.distribution)),
                        str(self.root)],
                       check=True, timeout=300)
        args = ["systemd-nspawn", "--quiet", "--directory", str(self.root), "--boot",
                "--register=no", "--keep-unit", "--machine", self.name, "--console=passive"]
        if self.bind_loop_devices:
            for device in ["/dev/loop-control", *sorted(glob.glob("/dev/loop[0-9]*"))]:
                args.append(f"--bind={device}")
        args += [f"--bind={path}" for path in self.binds]
        with open(self.console_log, "wb") as log:
            self._nspawn = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = self._wait_for_leader(timeout)
        # `is-system-running --wait` needs the container's D-Bus; retry until it answers.
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                self.boot_state = state
                return self
            if time.monotonic() > deadline:
                raise ContainerError(f"container did not boot: state {state!r}; "
                                     f"console: {self.console_log.read_text()[-2000:]}")
            time.sleep(0.2)

    def _wait_for_leader(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self._nspawn.returncode}: "
                                     f"{self.console_log.read_text()[-2000:]}")
            children = subprocess.run(["pgrep", "-P", str(self._nspawn.pid)],
                                      capture_output=True, text=True).stdout.split()
            for pid in children:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except OSError:
                    continue
            time.sleep(0.05)
        raise ContainerError("the container's systemd did not start")

    def poweroff(self, timeout: float = 60.0) -> None:
        """Shut the container down cleanly; kill it if it does not; then delete its root."""
        if self._nspawn is None:
            return
        if self._nspawn.poll() is None and self.leader:
            try:
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=15)
                self._nspawn.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._nspawn.poll() is None or (self.leader and _alive(self.leader)):
            # SIGKILL to the container's PID 1 ends its whole PID namespace; nspawn itself
            # does not take its payload with it when it is killed.
            for pid in (self.leader, self._nspawn.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self._nspawn.wait(timeout=30)
            deadline = time.monotonic() + 30
            while self.leader and _alive(self.leader) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._nspawn = None
        if self.leader and _alive(self.leader):
            raise ContainerError(f"container {self.name} (PID {self.leader}) would not die; "
                                 f"its root {self.root} is left in place")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Container":
        try:
            return self.boot()
        except BaseException:
            self.poweroff()
            raise

    def __exit__(self, *exc) -> None:
        self.poweroff()

    # -- inside -----------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 120.0,
            input: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command inside the container (all its namespaces, a clean environment)."""
        environment = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "TERM": "dumb",
                       "SYSTEMD_PAGER": "", "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
        command = ["nsenter", "--target", str(self.leader), "--all", "--root", "--wd=/",
                   "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                input=input)
        if check and result.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-ec", script], **kwargs)

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container."""
        return self.root / inside.lstrip("/")

    def copy_in(self, source: Path, inside: str) -> str:
        shutil.copy2(source, self.path(inside))
        return inside

    def wait_for(self, predicate, what: str, timeout: float = 60.0, interval: float = 0.2):
        """Poll ``predicate()`` until it returns a true value; fail naming ``what``."""
        from spotrun import waiting

        return waiting.wait_until(predicate, timeout, interval_s=interval, what=what, error=lambda: ContainerError(
            f"timed out after {timeout:.0f} s waiting for {what}"))


def apt_install(container: Container, deb: Path) -> str:
    """What a user does (docs/packaging.md): copy the .deb in, `apt-get install -y ./…`."""
    container.copy_in(deb, f"/root/{deb.name}")
    result = container.sh(f"cd /root && apt-get install -y ./{deb.name}", timeout=600)
    return result.stdout + result.stderr
