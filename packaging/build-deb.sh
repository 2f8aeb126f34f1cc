#!/bin/bash
# Build dist/spotrun_<version>_all.deb with Debian's own tooling (debhelper).
#
# The agent and its pinned pure-Python dependencies (requirements/agent.lock) are vendored
# into /usr/lib/spotrun, so the package runs on the distribution's python3 (Ubuntu 22.04's
# 3.10, 24.04's 3.12, Debian 12's 3.11) without pip, conda or the system's Python packages.
# Why vendoring and not dh-virtualenv: docs/packaging.md.
#
# Everything happens in a temporary copy of the sources, so the work tree stays clean.
# Environment: PIP (default: the project venv's pip), DIST (default: dist/), KEEP_BUILD=1.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dist="${DIST:-$repo/dist}"
pip_cmd=(${PIP:-$repo/.venv/bin/python -m pip})

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
      "$repo/packaging/spotrun.1" "$src/packaging/"
cp -a "$repo/packaging/debian" "$src/debian"
find "$src" \( -name __pycache__ -o -name '*.pyc' -o -name '*.egg-info' \) -prune -exec rm -rf {} +

# Examples under /usr/share/doc/spotrun/: the IAM policy and the example job (fleet/launch)
# files, when their owners have written them.
mkdir -p "$src/examples"
[[ -f "$repo/packaging/iam/agent-policy.json" ]] && cp "$repo/packaging/iam/agent-policy.json" "$src/examples/"
if compgen -G "$repo/examples/jobs/*.toml" > /dev/null; then
    cp "$repo"/examples/jobs/*.toml "$src/examples/"
fi

# The pinned dependencies, pure-Python wheels only (any platform, Python 3.10 markers, so
# tomli comes along for Ubuntu 22.04): the package is arch "all" and must not carry
# a CPython-version-specific extension (charset-normalizer also ships mypyc builds).
mkdir -p "$src/vendor"
grep -v '^\s*#' "$repo/requirements/agent.lock" | sed 's/;.*//' | grep -v '^\s*$' > "$build/requirements.txt"
"${pip_cmd[@]}" install --quiet --no-deps --no-compile --disable-pip-version-check \
    --only-binary=:all: --platform any --implementation py --python-version 3.10 --abi none \
    --target "$src/vendor" -r "$build/requirements.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
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
