# vm-agent developer entry points. Every target installs what it needs on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps native proto proto-check test lint demo bench bench-fleet interop packages clean

$(STAMP): pyproject.toml setup.py $(wildcard vm_agent/proto/*.proto)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m vm_agent.proto.generate >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

# Debian packages for netfilter/netns tests and the DNS benchmark (installed when root, else tests skip).
system-deps:
	@bash scripts/install-system-deps.sh

# The native stats filter for the shipped Envoy (vm_agent/telemetry/native; rebuilt when its sources change).
native: $(STAMP) system-deps
	$(BIN)/python -m vm_agent.telemetry.native.build --require >/dev/null

proto: $(STAMP)
	$(BIN)/python -m vm_agent.proto.generate

proto-check: $(STAMP)
	$(BIN)/python -m vm_agent.proto.generate --check

lint: $(STAMP) proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) system-deps native
	$(BIN)/pytest -q -n 2 tests

demo: $(STAMP)
	$(BIN)/python -m vm_agent.telemetry.native.build >/dev/null
	$(BIN)/python -m vm_agent.demo

bench: $(STAMP) system-deps native
	$(BIN)/python -m bench

# The fleet simulator (bench/fleet): FLEET_VMS simulated VMs against the interop lab's real control plane (built by
# tests/interop/build.sh), NDS+health with the new and the old health design, then full ADS; writes bench/results/fleet.md.
# The lab needs 127.0.0.1:15012 and the machine: both locks are held for the whole run.
FLEET_VMS ?= 1000
FLEET_LOCKS := flock /tmp/vm-agent-interop.lock flock /tmp/vm-agent-bench.lock
bench-fleet: $(STAMP)
	bash tests/interop/build.sh
	$(FLEET_LOCKS) $(BIN)/python -m bench.fleet run --vms $(FLEET_VMS) --mode nds --design new --out bench/results/fleet/nds-new.json
	$(FLEET_LOCKS) $(BIN)/python -m bench.fleet run --vms $(FLEET_VMS) --mode nds --design old --scenarios steady --out bench/results/fleet/nds-old.json
	$(FLEET_LOCKS) $(BIN)/python -m bench.fleet run --vms $(FLEET_VMS) --mode ads --design new --scenarios steady,nds,flip --out bench/results/fleet/ads-new.json
	$(FLEET_LOCKS) $(BIN)/python -m bench.fleet run --vms $(FLEET_VMS) --mode nds --design new --scenarios storm --out bench/results/fleet/storm-check.json
	$(BIN)/python -m bench.fleet report

# Builds (or reuses, from ~/.cache/vm-agent-interop) etcd, kube-apiserver, istiod, istioctl and pilot-agent from the
# Go module proxy, then runs the suite against them on loopback.
interop: $(STAMP) system-deps native
	bash tests/interop/run.sh

# deb and rpm (nfpm) into dist/; see docs/packaging.md.
packages: $(STAMP)
	bash packaging/build.sh dist

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
