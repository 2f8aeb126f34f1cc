#!/bin/bash
# Build dist/spotrun_<version>_all.deb with Debian's own tooling (debhelper).
#
# The agent and its pinned pure-Python dependencies (requirements/agent.lock) are vendored
# into /usr/lib/spotrun, so the package runs on the distribution's python3 (Ubuntu 22.04's
# 3.10, 24.04's 3.12, Debian 12's 3.11) without pip, conda or the system's Python packages.
# Why vendoring and not dh-virtualenv: docs/packaging.md.
#
# Everything happens in a temporary copy of the sources, so the work tree stays clean.
# Environment: PIP (default: the project venv's pip), PYTHON (runs the dependency check;
# default: the project venv's python), DIST (default: dist/), KEEP_BUILD=1.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dist="${DIST:-$repo/dist}"
pip_cmd=(${PIP:-$repo/.venv/bin/python -m pip})
python="${PYTHON:-$repo/.venv/bin/python}"
# The system Pythons the one arch-all package must run on: Ubuntu 22.04 (3.10), Debian 12
# (3.11), Ubuntu 24.04 (3.12), Debian 13 (3.13). Keep in step with debian/control's python3.
supported_pythons="3.10 3.11 3.12 3.13"

version="$(sed -n 's/^version *= *//p' "$repo/setup.cfg")"
changelog_version="$(sed -n '1s/^spotrun (\([^)]*\)).*/\1/p' "$repo/packaging/debian/changelog")"
if [[ "$version" != "$changelog_version" ]]; then
    echo "build-deb: setup.cfg version $version != packaging/debian/changelog version $changelog_version;" \
         "add a changelog entry for $version" >&2
    exit 1
fi

build="$(mktemp -d /tmp/spotrun-deb.XXXXXX)"
cleanup() { [[ -n "${KEEP_BUILD:-}" ]] && echo "build tree kept: $build" || rm -rf "$build"; }
trap cleanup EXIT

src="$build/spotrun-$version"
mkdir -p "$src"
# Only what the package is made of: no Makefile (dh_auto_* would run it), no .venv, no tests.
cp -a "$repo/agent" "$repo/trainer" "$repo/systemd" "$repo/setup.cfg" "$repo/README.md" "$src/"
mkdir -p "$src/packaging"
cp -a "$repo/packaging/bin" "$repo/packaging/libexec" "$repo/packaging/agent.toml" \
      "$repo/packaging/spotrun.1" "$repo/packaging/exclude.txt" "$src/packaging/"
cp -a "$repo/packaging/debian" "$src/debian"
find "$src" \( -name __pycache__ -o -name '*.pyc' -o -name '*.egg-info' \) -prune -exec rm -rf {} +

# Examples under /usr/share/doc/spotrun/: the IAM policy and the example job (fleet/launch)
# files, when their owners have written them.
mkdir -p "$src/examples"
[[ -f "$repo/packaging/iam/agent-policy.json" ]] && cp "$repo/packaging/iam/agent-policy.json" "$src/examples/"
if compgen -G "$repo/examples/jobs/*.toml" > /dev/null; then
    cp "$repo"/examples/jobs/*.toml "$src/examples/"
fi

# The pinned dependencies, pure-Python wheels only (any platform): the package is arch
# "all" and must not carry a CPython-version-specific extension (charset-normalizer also
# ships mypyc builds). Every line of the lock is vendored, its marker dropped: one package
# serves every supported Python, so what only 3.10 needs (tomli, typing_extensions) comes
# along and stays unused on the others. --no-deps, and pip evaluates markers for the Python
# it runs on whatever --python-version says, so the check below, not pip, makes sure that
# the lock holds every dependency each supported Python needs.
mkdir -p "$src/vendor"
grep -v '^\s*#' "$repo/requirements/agent.lock" | sed 's/;.*//' | grep -v '^\s*$' > "$build/requirements.txt"
"${pip_cmd[@]}" install --quiet --no-deps --no-compile --disable-pip-version-check \
    --only-binary=:all: --platform any --implementation py --python-version 3.10 --abi none \
    --target "$src/vendor" -r "$build/requirements.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# From requirements/agent.in, follow each vendored distribution's Requires-Dist with the
# markers evaluated for each supported Python in turn: every distribution reached must be
# vendored at a version that satisfies the requirement and whose Requires-Python admits
# that Python; and every vendored one must be reached on at least one of them.
"$python" - "$src/vendor" "$repo/requirements/agent.in" $supported_pythons <<'EOF'
import sys
from importlib.metadata import distributions

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
except ImportError:  # a Python without packaging: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name

vendor, roots_file, *pythons = sys.argv[1:]
vendored = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[vendor])}
roots = [Requirement(line.split("#")[0].strip()) for line in open(roots_file)
         if line.split("#")[0].strip()]
problems, reached = [], set()


def applies(req, python, extra=""):
    environment = {"python_version": python, "python_full_version": python + ".0",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython",
                   "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                   "extra": extra}
    return req.marker is None or req.marker.evaluate(environment)


for python in pythons:
    todo = [(req, "requirements/agent.in") for req in roots if applies(req, python)]
    seen = set()
    while todo:
        req, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        dist = vendored.get(name)
        if dist is None:
            problems.append(f"{req.name} ({req}, required by {wanted_by} on Python {python}) "
                            "is missing from requirements/agent.lock: add it, pinned as in "
                            "requirements/dev.lock, with the same marker")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{wanted_by} requires {req} on Python {python}; "
                            f"requirements/agent.lock pins {dist.version}")
        requires_python = dist.metadata.get("Requires-Python")
        if (name, "") not in seen and requires_python and \
                not SpecifierSet(requires_python).contains(python + ".0"):
            problems.append(f"{dist.metadata['Name']} {dist.version} requires Python "
                            f"{requires_python}, which excludes {python}")
        for extra in ("", *req.extras):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in dist.requires or ():
                dep = Requirement(line)
                if applies(dep, python, extra):
                    todo.append((dep, f"{dist.metadata['Name']} {dist.version}"))
    reached |= {name for name, _ in seen}
for name in sorted(set(vendored) - reached):
    problems.append(f"requirements/agent.lock pins {name}, which no supported Python "
                    f"({', '.join(pythons)}) needs")
if problems:
    sys.exit("build-deb: the vendored dependency set is wrong:\n  " + "\n  ".join(problems))
EOF
# Not part of the installed library: console scripts (spotrun has its own launcher) and
# upstream test suites. Modules are not executables: drop the odd "#!/usr/bin/env python"
# line some carry (requests/certs.py) and the executable bits.
rm -rf "$src/vendor/bin"
find "$src/vendor" -depth -type d -name tests -path "$src/vendor/*/tests" -exec rm -rf {} +
find "$src/vendor" -name '*.py' -exec sed -i '1{/^#!/d}' {} + -exec chmod a-x {} +

(cd "$src" && dpkg-buildpackage --build=binary --unsigned-source --unsigned-changes --no-sign -rfakeroot) \
    > "$build/dpkg-buildpackage.log" 2>&1 || { cat "$build/dpkg-buildpackage.log" >&2; exit 1; }

mkdir -p "$dist"
deb="$build/spotrun_${version}_all.deb"
cp "$deb" "$dist/"
echo "$dist/spotrun_${version}_all.deb"
