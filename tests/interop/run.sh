#!/usr/bin/env bash
# CI entry for the interop suite (.ci/run calls this): build the real control plane (or reuse the cache),
# then run every @pytest.mark.interop test. Exits non-zero if the build or any test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
bash tests/interop/build.sh
built=$(date +%s)
echo "interop: build/cache check took $((built - start))s"
PY=${PYTHON:-.venv/bin/python}
rc=0
# The loopback suite and the network lab (tests/interop/netlab: the control plane and the VMs in network
# namespaces) each bring up their own control plane; separate runs keep only one up at a time.
"$PY" -m pytest -q -p no:cacheprovider -m interop tests/interop --ignore=tests/interop/netlab "$@" || rc=$?
loopback=$(date +%s)
echo "interop: loopback suite took $((loopback - built))s (rc=$rc)"
"$PY" -m pytest -q -rA -p no:cacheprovider -m interop tests/interop/netlab "$@" || rc=$?
echo "interop: network lab took $(( $(date +%s) - loopback ))s; whole suite $(( $(date +%s) - built ))s (rc=$rc); component logs in ${VM_AGENT_INTEROP_CACHE:-$HOME/.cache/vm-agent-interop}/last-run-logs"
exit $rc
