#!/usr/bin/env bash
# Builds the real control plane the interop suite runs against, from the Go module proxy only
# (`go install` / `go build`), into a cache folder outside git. Nothing here is committed; a second run
# reuses every binary whose pin file matches, so CI on the same machine pays the build once.
#
#   etcd + kube-apiserver  from a throwaway harness module that pins Kubernetes' staging modules
#   pilot-discovery (istiod) + istioctl  from istio.io/istio at ISTIO_VERSION
#   istio-crds.yaml  copied from the same istio module, so the CRDs match the istiod we run
#
# Env: VM_AGENT_INTEROP_CACHE (default ~/.cache/vm-agent-interop), GOMODCACHE/GOCACHE are honoured, so a
# cold build can be measured with throwaway ones.
set -euo pipefail

ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad
K8S_VERSION=v1.36.3
# etcd/server at the version kube-apiserver v1.36.3 already selects for its etcd client (go list -m).
ETCD_VERSION=v3.6.8

W=${VM_AGENT_INTEROP_CACHE:-$HOME/.cache/vm-agent-interop}
B=$W/bin
mkdir -p "$B" "$W/src/localkube"
export CGO_ENABLED=0
NICE=${VM_AGENT_INTEROP_NICE:-nice -n 10}

# Debian's golang is too old for 'go get -tool'; the machine image has Go in /usr/local/go.
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "build.sh: 'go' not found on PATH or in /usr/local/go/bin (need Go >= 1.24)" >&2; exit 2; }
# The suite drives the apiserver with kubectl >= 1.24 ('create token'); Debian bookworm's 1.20 is too old.
command -v kubectl >/dev/null || echo "build.sh: warning: no kubectl on PATH; the interop suite needs kubectl >= 1.24" >&2

# A binary counts as built only if its pin file names the version this script asks for; a half-written
# binary from an interrupted run has no pin file and is rebuilt.
have() { [ -x "$B/$1" ] && [ "$(cat "$B/$1.pin" 2>/dev/null)" = "$2" ]; }
pin() { echo "$2" > "$B/$1.pin"; }

t0=$(date +%s)
if have pilot-discovery "$ISTIO_VERSION" && have istioctl "$ISTIO_VERSION" && have pilot-agent "$ISTIO_VERSION" \
  && [ -s "$W/istio-crds.yaml" ]; then
  echo "build.sh: istiod + istioctl + pilot-agent $ISTIO_VERSION cached in $B"
else
  echo "build.sh: building pilot-discovery + istioctl $ISTIO_VERSION ($(date -u +%T))"
  # One command for all so they share one compile of istio's dependencies. Tags = Istio's STANDARD_TAGS.
  # pilot-agent is the named peer of bench/bench_startup.py.
  GOBIN=$B $NICE go install -trimpath -tags vtprotobuf,disable_pgv -ldflags "-s -w" \
    "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_VERSION" \
    "istio.io/istio/istioctl/cmd/istioctl@$ISTIO_VERSION" \
    "istio.io/istio/pilot/cmd/pilot-agent@$ISTIO_VERSION"
  ISTIO_DIR=$(go mod download -json "istio.io/istio@$ISTIO_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  cp "$ISTIO_DIR/manifests/charts/base/files/crd-all.gen.yaml" "$W/istio-crds.yaml.tmp"
  chmod u+w "$W/istio-crds.yaml.tmp" && mv "$W/istio-crds.yaml.tmp" "$W/istio-crds.yaml"
  pin pilot-discovery "$ISTIO_VERSION"; pin istioctl "$ISTIO_VERSION"; pin pilot-agent "$ISTIO_VERSION"
fi
t1=$(date +%s)

if have kube-apiserver "$K8S_VERSION" && have etcd "$ETCD_VERSION"; then
  echo "build.sh: kube-apiserver $K8S_VERSION + etcd $ETCD_VERSION cached in $B"
else
  echo "build.sh: building kube-apiserver $K8S_VERSION + etcd $ETCD_VERSION ($(date -u +%T))"
  cd "$W/src/localkube"
  [ -f go.mod ] || go mod init local.invalid/localkube
  STAGING=v0.${K8S_VERSION#v1.}
  # k8s.io/kubernetes requires its staging modules at v0.0.0 with replaces that a dependent module ignores:
  # pin every one of them to the matching published v0.X.Y.
  KMOD=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  for m in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$KMOD" | sort -u); do
    go mod edit -replace="$m=$m@$STAGING"
  done
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION"
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
  $NICE go build -trimpath -o "$B/kube-apiserver.tmp" -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$K8S_MINOR" \
    k8s.io/kubernetes/cmd/kube-apiserver
  mv "$B/kube-apiserver.tmp" "$B/kube-apiserver"; pin kube-apiserver "$K8S_VERSION"
  $NICE go build -trimpath -o "$B/etcd.tmp" -ldflags "-s -w" go.etcd.io/etcd/server/v3
  mv "$B/etcd.tmp" "$B/etcd"; pin etcd "$ETCD_VERSION"
fi
t2=$(date +%s)
echo "build.sh: done in $((t2 - t0))s (istio $((t1 - t0))s, kube $((t2 - t1))s); binaries in $B"
