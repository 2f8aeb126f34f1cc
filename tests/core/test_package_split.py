"""The .deb ships the agent and the trainer library only (packaging/exclude.txt names what it
leaves out): no module it keeps imports one it leaves out, and ``spotrun`` assembles its
subcommands from what is installed."""
from __future__ import annotations

import ast
import json
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from spotrun import cli

REPO = Path(__file__).resolve().parents[2]
EXCLUDE = REPO / "packaging/exclude.txt"
# Where each top-level directory of /usr/lib/spotrun is copied from (packaging/debian/rules).
SOURCES = {"spotrun": REPO / "agent", "spotrun_trainer": REPO / "trainer"}
# What the unit, the launcher (packaging/bin/spotrun) and `python -m spotrun` start from.
AGENT_ENTRIES = ("spotrun.cli", "spotrun.__main__", cli.SUBCOMMANDS["agent"], "spotrun_trainer")


def _patterns() -> list[str]:
    """exclude.txt's patterns, read as debian/rules reads them."""
    lines = (line.split("#", 1)[0].strip() for line in EXCLUDE.read_text().splitlines())
    return [line for line in lines if line]


def _module_name(top: str, path: Path) -> str:
    parts = path.relative_to(SOURCES[top]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(top, path): path
            for top, root in SOURCES.items() for path in (root / top).rglob("*.py")}


def _left_out() -> dict[str, list[str]]:
    """Each pattern and the modules it leaves out."""
    out = {}
    for pattern in _patterns():
        top = pattern.split("/", 1)[0]
        paths = []
        for match in SOURCES[top].glob(pattern):
            paths += match.rglob("*.py") if match.is_dir() else [match]
        out[pattern] = sorted(_module_name(top, p) for p in paths)
    return out


def _imports(source: str, module: str, is_package: bool) -> set[str]:
    """Every name ``module`` may import, wherever the statement is (inside functions too),
    relative imports resolved; ``from a import b`` counts both ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _within(name: str, modules) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:end]) in modules for end in range(1, len(parts) + 1))


def test_the_import_walk_sees_lazy_and_relative_imports():
    source = ("import json\n"
              "def later():\n"
              "    from .harness import soak\n"
              "    from . import localcloud\n"
              "    import spotrun.operator.cli\n")
    found = _imports(source, "spotrun.lifecycle", is_package=False)
    assert {"spotrun.harness", "spotrun.localcloud", "spotrun.operator.cli", "json"} <= found
    assert _imports("from ..harness.soak import x\n", "spotrun.localcloud", is_package=True) >= \
        {"spotrun.harness.soak", "spotrun.harness.soak.x"}


def test_each_pattern_leaves_out_something_and_never_what_the_agent_starts_from():
    left_out = _left_out()
    assert all(left_out.values()), {p: m for p, m in left_out.items() if not m}
    gone = {m for modules in left_out.values() for m in modules}
    assert not [entry for entry in AGENT_ENTRIES if _within(entry, gone)]
    # What the package is for leaves: the local cloud and the soak among them.
    assert {"spotrun.localcloud.cli", "spotrun.harness.soak", "spotrun.operator.cli"} <= gone


def test_no_module_the_package_keeps_imports_one_it_leaves_out():
    gone = {m for modules in _left_out().values() for m in modules}
    kept = {name: path for name, path in _modules().items() if name not in gone}
    assert set(AGENT_ENTRIES) <= set(kept)
    reached = []
    for name, path in sorted(kept.items()):
        for imported in _imports(path.read_text(), name, path.name == "__init__.py"):
            if _within(imported, gone):
                reached.append(f"{name} imports {imported}")
    assert reached == [], ("keep the imported module in the package (drop it from "
                           "packaging/exclude.txt) or stop importing it", reached)


# Issue 14: faults are injected from outside (spotrun.localcloud.faultagent, left out): the
# package never reads these, nor kills or stops its own process.
FAULT_ENV = ("SPOTRUN_CRASH_AT", "SPOTRUN_PAUSE_AT", "SPOTRUN_RECORD_AWS_CALLS")
_FATAL_SIGNALS = {"SIGKILL", "SIGSTOP", int(signal.SIGKILL), int(signal.SIGSTOP)}
_OWN_ID_CALLS = {"getpid", "getpgrp", "getpgid"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _fault_injections(source: str) -> list[str]:
    """What in ``source`` kills or stops its own process (os.kill/killpg of its own pid or
    group, 0 or -1, with SIGKILL or SIGSTOP; signal.raise_signal/pthread_kill of them) or names
    one of the fault variables (FAULT_ENV), each as "line N: what"."""
    tree = ast.parse(source)
    own_names = set()  # names (or attributes) ever assigned this process's pid or group
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call) \
                and _dotted(node.value.func).rpartition(".")[2] in _OWN_ID_CALLS:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            own_names |= {_dotted(t).rpartition(".")[2] for t in targets}

    def fatal(arg: ast.AST) -> bool:
        if isinstance(arg, ast.Constant):
            return isinstance(arg.value, int) and arg.value in _FATAL_SIGNALS
        return _dotted(arg).rpartition(".")[2] in _FATAL_SIGNALS

    def own(arg: ast.AST) -> bool:
        if isinstance(arg, ast.Call):
            return _dotted(arg.func).rpartition(".")[2] in _OWN_ID_CALLS
        if isinstance(arg, ast.UnaryOp) and isinstance(arg.op, ast.USub):
            return isinstance(arg.operand, ast.Constant) and arg.operand.value == 1
        if isinstance(arg, ast.Constant):
            return arg.value == 0
        return bool(_dotted(arg)) and _dotted(arg).rpartition(".")[2] in own_names

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in FAULT_ENV:
            found.append(f"line {node.lineno}: names {node.value}")
        if not isinstance(node, ast.Call):
            continue
        func, args = _dotted(node.func).rpartition(".")[2], node.args
        if (func in ("kill", "killpg") and len(args) >= 2 and own(args[0]) and fatal(args[1])) \
                or (func == "raise_signal" and args and fatal(args[0])) \
                or (func == "pthread_kill" and len(args) >= 2 and fatal(args[1])):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_fault_check_sees_a_process_killing_or_stopping_itself():
    planted = ("import os, signal\n"
               "from os import kill, getpid\n"
               "def f(pid):\n"
               "    os.kill(os.getpid(), signal.SIGKILL)\n"
               "    kill(getpid(), signal.Signals.SIGSTOP)\n"
               "    me = os.getpid()\n"
               "    os.kill(me, 19)\n"
               "    os.killpg(os.getpgrp(), signal.SIGKILL)\n"
               "    os.kill(0, signal.SIGSTOP)\n"
               "    signal.raise_signal(signal.SIGKILL)\n"
               "    if os.environ.get('SPOTRUN_CRASH_AT') == 'x': pass\n"
               "    open(os.getenv('SPOTRUN_RECORD_AWS_CALLS'), 'a')\n")
    lines = sorted(int(f.split(":")[0].split()[1]) for f in _fault_injections(planted))
    assert lines == [4, 5, 7, 8, 9, 10, 11, 12]
    innocent = ("import os, signal\n"
                "os.killpg(pid, signal.SIGKILL)\n"         # the trainer's group
                "os.killpg(self._popen.pid, signal.SIGSTOP)\n"
                "os.kill(os.getpid(), signal.SIGTERM)\n"
                "os.environ.get('SPOTRUN_CONFIG')\n")
    assert _fault_injections(innocent) == []


def test_no_module_the_package_keeps_injects_faults_into_its_own_process():
    """Issue 14: crash and pause points and the recording of AWS calls are hooks a test
    launcher installs (spotrun.localcloud.faultagent, left out of the package); nothing the
    package keeps reads the fault variables, or SIGKILLs or SIGSTOPs its own process."""
    gone = {m for modules in _left_out().values() for m in modules}
    kept = {name: path for name, path in _modules().items() if name not in gone}
    assert "spotrun.crashpoints" in kept and "spotrun.localcloud.faultagent" in gone
    found = [f"{name} {what}" for name, path in sorted(kept.items())
             for what in _fault_injections(path.read_text())]
    assert found == [], found
    # The fault points themselves: no signal, no environment.
    crashpoints = kept["spotrun.crashpoints"]
    assert not _imports(crashpoints.read_text(), "spotrun.crashpoints", False) & {"os", "signal"}
    # ...while the launcher, left out, does both (the check would see it).
    assert _fault_injections(_modules()["spotrun.localcloud.faultagent"].read_text())


def _pruned_copy(tmp_path: Path) -> Path:
    """/usr/lib/spotrun's modules as debian/rules leaves them (without the vendored set)."""
    lib = tmp_path / "lib"
    for top, root in SOURCES.items():
        shutil.copytree(root / top, lib / top, ignore=shutil.ignore_patterns("__pycache__"))
    for pattern in _patterns():
        for match in list(lib.glob(pattern)):
            shutil.rmtree(match) if match.is_dir() else match.unlink()
    return lib


def test_the_pruned_package_imports_whole_and_its_help_lists_only_the_agent(tmp_path):
    lib = _pruned_copy(tmp_path)
    kept = sorted(".".join(p.relative_to(lib).with_suffix("").parts).removesuffix(".__init__")
                  for p in (lib / "spotrun").rglob("*.py") if p.name != "__main__.py")
    # -ISB as the launcher runs: no site, so not the work tree's editable install (its finder
    # would supply the left-out modules); the venv's site-packages appended for boto3 and
    # structlog, as the vendored set is in the package.
    probe = ("import importlib, json, sys\n"
             f"sys.path[:0] = [{str(lib)!r}]\n"
             f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
             f"for name in {kept!r}: importlib.import_module(name)\n"
             "from spotrun import cli\n"
             "[action] = [a for a in cli.build_parser(['--help'])._actions if a.dest == 'command']\n"
             "print(json.dumps({'commands': list(action.choices),\n"
             "                  'from': sys.modules['spotrun'].__file__}))\n")
    result = subprocess.run([sys.executable, "-ISB", "-c", probe], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["from"].startswith(str(lib))
    assert out["commands"] == ["agent"]


# Refuses the left-out modules as an installation without them would: ModuleNotFoundError
# naming the missing module.
_HIDE = """
import json, sys
hidden = json.loads(sys.argv[1])

class Absent:
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in hidden):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
from spotrun import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def _spotrun_without(hidden, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _HIDE, json.dumps(sorted(hidden)), *argv],
                          capture_output=True, text=True, timeout=120)


def _help_commands(help_text: str) -> list[str]:
    """The subcommands argparse lists under COMMAND in ``--help``."""
    block = help_text.split("  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in block.splitlines()
            if line.startswith("    ") and not line.startswith("     ")]


def test_help_lists_only_the_installed_subcommands_and_a_missing_one_says_so():
    gone = {m for modules in _left_out().values() for m in modules}
    everything = _spotrun_without(set(), "--help")
    assert everything.returncode == 0, everything.stderr
    assert _help_commands(everything.stdout) == list(cli.SUBCOMMANDS)  # the parse can see them

    agent_only = _spotrun_without(gone, "--help")
    assert agent_only.returncode == 0, agent_only.stderr
    assert _help_commands(agent_only.stdout) == ["agent"]

    for command in ("soak", "localcloud", "launch"):
        missing = _spotrun_without(gone, command, "--help")
        assert missing.returncode == 2, (command, missing)
        assert missing.stdout == ""
        [line] = missing.stderr.splitlines()
        assert line.startswith(f"spotrun: {command!r} is not installed here"), line
        assert cli.SUBCOMMANDS[command] in line
    # The agent itself is untouched by what is missing.
    agent = _spotrun_without(gone, "agent", "run", "--help")
    assert agent.returncode == 0 and "--no-user-data" in agent.stdout, agent


def test_a_present_module_missing_its_own_imports_still_fails_loudly():
    # Installed but broken (a sibling module or a library gone): not a left-out command, so
    # the error shows instead of the command quietly vanishing from --help.
    for hidden, command in (("spotrun.localcloud.control", "localcloud"), ("boto3", "launch")):
        for argv in (["--help"], [command, "--help"]):
            broken = _spotrun_without({hidden}, *argv)
            assert broken.returncode == 1, (hidden, argv, broken)
            last = broken.stderr.splitlines()[-1]
            # `from spotrun.localcloud import control` reports ImportError, `import boto3`
            # ModuleNotFoundError (a subclass): either way the import error itself.
            assert last.startswith(("ImportError:", "ModuleNotFoundError:")), broken.stderr
            assert repr(hidden.rpartition(".")[2]) in last, broken.stderr


def _declared_distributions() -> set[str]:
    """setup.cfg's install_requires and every extra, with what they pull in (as installed)."""
    import configparser
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in config["options.extras_require"].values():
        lines += extra.splitlines()
    # Declared ones count whatever their marker (tomli, for Python < 3.11, is imported only
    # there); what they pull in, as this Python's installation resolved it.
    todo = [Requirement(line) for line in lines if line.strip()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or ()
        except metadata.PackageNotFoundError:  # a marker excludes it from this Python
            continue
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                         for e in ("", *req.extras)):
                todo.append(dep)
    return seen


def test_setup_cfg_declares_what_the_left_out_parts_import():
    """`pip install .[localcloud]` brings what the package leaves out needs (moto, psutil...)."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    gone = {m for modules in _left_out().values() for m in modules}
    modules = _modules()
    providers = metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = set()
    for name in gone:
        path = modules[name]
        for imported in _imports(path.read_text(), name, path.name == "__init__.py"):
            top = imported.split(".")[0]
            if top in sys.stdlib_module_names or top in SOURCES or top == "__future__":
                continue
            dists = {canonicalize_name(d) for d in providers.get(top, [top])}
            if not dists & declared:
                undeclared.add(f"{name} imports {top}")
    assert sorted(undeclared) == []
