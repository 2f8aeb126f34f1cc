"""The rehearsal's set-up: the demo's training code, one-commit git repositories (the job's
code, as the agent clones it), the lease table, and the check that the trainer's user can
reach the work (split from rehearsal.py, which re-exports these names)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from spotrun.errors import UsageError

DEMO_TRAIN_PY = '''\
"""Rehearsal training code: spotrun's reference trainer (tiny model) on a small synthetic
CIFAR10-format data set, generated onto the volume on first run (labelled as synthetic).
DEMO_STEP_S paces it (a sleep per step, the numbers unchanged): the tiny model trains a step in
milliseconds, and the notice must land mid-training, not after the last step."""
import os
import subprocess
import sys
from pathlib import Path

data = Path(os.environ["SPOTRUN_DATA_DIR"])
if not (data / "cifar-10-batches-py" / "test_batch").exists():
    subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "synth", "--dest", str(data),
                    "--train", os.environ.get("DEMO_TRAIN", "2048"),
                    "--test", os.environ.get("DEMO_TEST", "512"), "--seed", "7"], check=True)
args = [sys.executable, "-m", "spotrun_trainer.resnet_cifar", "--model", "tiny",
        "--epochs", os.environ.get("DEMO_EPOCHS", "3"),
        "--batch-size", os.environ.get("DEMO_BATCH", "32"),
        "--step-seconds", os.environ.get("DEMO_STEP_S", "0.05")] + sys.argv[1:]
os.execv(sys.executable, args)  # the trainer takes this process's place: signals reach it
'''


def commit_repository(path: Path, files: dict[str, str | Path], message: str) -> str:
    """A one-commit git repository (branch main) at ``path`` holding ``files`` (name -> text,
    or a file to copy); returns its file:// URL, as the agent's `code.repository` takes it."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copy(content, target)
        else:
            target.write_text(content)
    git = ["git", "-c", "user.name=spotrun", "-c", "user.email=spotrun@localhost", "-C", str(path)]
    if not (path / ".git").exists():
        subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    # A repository made by an earlier run with the same files has nothing new to commit.
    unchanged = subprocess.run(git + ["diff", "--cached", "--quiet"]).returncode == 0
    has_head = subprocess.run(git + ["rev-parse", "-q", "--verify", "HEAD"],
                              capture_output=True).returncode == 0
    if not (unchanged and has_head):
        subprocess.run(git + ["commit", "-q", "-m", message], check=True)
    return f"file://{path.resolve()}"  # the agent clones from its own directory


def ensure_lease_table(cloud, name: str) -> None:
    """The job's lease table on the local cloud, as `spotrun init` creates it on AWS."""
    from botocore.exceptions import ClientError

    from spotrun import lease

    try:
        cloud.client("dynamodb", faults=False).create_table(**lease.table_definition(name))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
            raise


def make_demo_repository(path: Path) -> str:
    """A git repository holding the rehearsal's training code; returns its file:// URL."""
    return commit_repository(path, {"train.py": DEMO_TRAIN_PY}, "rehearsal training code")


def _check_reachable(user: str, paths: list[Path]) -> None:
    """The trainer runs as ``user``: it must be able to traverse to the work and interpreter."""
    import pwd
    import stat

    if user == "root" or os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--trainer-user: no such user {user!r}") from None
    for path in paths:
        for directory in [path, *path.parents]:
            if directory != Path("/") and not directory.stat().st_mode & stat.S_IXOTH:
                raise UsageError(
                    f"the trainer runs as {user!r}, who cannot enter {directory} (mode "
                    f"{stat.filemode(directory.stat().st_mode)}): choose --out elsewhere, "
                    f"allow it (chmod o+x {directory}), or use --trainer-user root")
