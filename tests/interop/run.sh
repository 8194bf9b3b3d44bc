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
"$PY" -m pytest -q -p no:cacheprovider -m interop tests/interop "$@" || rc=$?
echo "interop: suite took $(( $(date +%s) - built ))s (rc=$rc); component logs in ${VM_AGENT_INTEROP_CACHE:-$HOME/.cache/vm-agent-interop}/last-run-logs"
exit $rc
