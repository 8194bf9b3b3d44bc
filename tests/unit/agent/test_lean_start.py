"""What `vm-agent run` imports, and when (issue 16): the real CLI in a fresh interpreter, stopped at two moments.

* When Envoy is spawned, only what starting Envoy needs is loaded: no gRPC, protobuf, TLS client, key or DNS
  code yet (they load while Envoy boots).
* Once every service is built, nothing `run` does not use is loaded: not the local mesh, the demo, the doctor,
  other sub-commands, nor the libraries the agent replaced (grpcio, aiohttp, prometheus_client, cryptography,
  psutil), nor Envoy's listener/cluster protos (loaded only when a response needs the telemetry rewrite).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.fixtures import ISTIOCTL_FIXTURES
from tests.helpers.net import free_port
from tests.unit.identity.pki import ThrowawayCA

REPO = Path(__file__).resolve().parents[3]

# Runs `vm-agent run` for real up to the moment Envoy would be spawned, records sys.modules there, then builds
# every service as the agent does next and records sys.modules again; nothing is started or dialled.
_DRIVER = """
import json, sys
import vm_agent.envoy.supervisor as supervisor

seen = {}

async def spawn_instead(self, bootstrap):
    seen["at_envoy_start"] = sorted(sys.modules)
    raise RuntimeError("stopped where Envoy would start")

supervisor.Supervisor._start = spawn_instead

import vm_agent.agent as agent_module

real_run = agent_module.Agent.run

async def run_and_build(self):
    import socket
    try:
        await real_run(self)
    except BaseException:
        pass
    a, b = socket.socketpair(socket.AF_UNIX)
    self._build(a, b)
    seen["after_build"] = sorted(sys.modules)

agent_module.Agent.run = run_and_build

from vm_agent.cli import main

main(sys.argv[1:])
print(json.dumps(seen))
"""

LIBRARIES_REPLACED = ("grpc", "grpc_tools", "grpc_health", "aiohttp", "yarl", "prometheus_client", "psutil")
NOT_RUN = ("vm_agent.mesh", "vm_agent.demo", "vm_agent.doctor", "vm_agent.status.client", "vm_agent.proto.ca_pb2_grpc")
AFTER_ENVOY = (
    "grpclib",
    "h2",
    "google.protobuf",
    "envoy",
    "cryptography",
    "uvloop",
    "vm_agent.identity.manager",
    "vm_agent.identity.sds",
    "vm_agent.xds",
    "vm_agent.dns",
    "vm_agent.telemetry",
    "vm_agent.health",
    "vm_agent.upstream",
)
ONLY_WHEN_NEEDED = (
    "cryptography",  # the key helper's business (identity/keygen.py)
    "vm_agent.identity.csr",
    "vm_agent.telemetry.rewrite",  # the first LDS/CDS response that names an istio-proxy filter
    "envoy.config.listener",
    "envoy.config.cluster",
    "vm_agent.netfilter",  # capture rules applied by the unit, not the agent
    "vm_agent.health.grpc_probe",  # the fixture's probe is httpGet
    "urllib.request",
    "http.client",
    "http.server",
    "importlib.metadata",
)


def _loaded(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    tmp = tmp_path_factory.mktemp("lean")
    resolv = tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    # istioctl's files, with a real root certificate and a token in place of the fixture's placeholders (the
    # agent refuses to start with those).
    files = tmp / "files"
    files.mkdir()
    for f in (ISTIOCTL_FIXTURES / "ipv4").iterdir():
        (files / f.name).write_bytes(f.read_bytes())
    (files / "root-cert.pem").write_bytes(ThrowawayCA.create("lean root").pem)
    (files / "istio-token").write_text("header.payload.signature\n")
    argv = [
        "run",
        "--config-dir",
        str(files),
        "--state-dir",
        str(tmp / "state"),
        "--resolv-conf",
        str(resolv),
        "--set",
        f"PROXY_CONFIG=configPath: {tmp / 'proxy'}\nstatusPort: {free_port()}\nproxyAdminPort: {free_port()}\n",
        "--set",
        f"VM_AGENT_SDS_SOCKET={tmp / 'sds.sock'}",
        "--set",
        "VM_AGENT_SCAN_INTERFACES=false",
        "--set",
        f"VM_AGENT_ENVOY_BINARY={sys.executable}",
    ]
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER, *argv], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the driver printed nothing\nstdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-4000:]}"
    seen: dict[str, list[str]] = json.loads(lines[-1])
    assert set(seen) == {"at_envoy_start", "after_build"}, out.stderr[-4000:]
    return seen


def test_envoy_starts_before_grpc_protobuf_tls_and_keys_load(modules: dict[str, list[str]]) -> None:
    early = modules["at_envoy_start"]
    assert "vm_agent.envoy.supervisor" in early and "vm_agent.config.loader" in early
    assert _loaded(early, AFTER_ENVOY) == []
    assert _loaded(early, LIBRARIES_REPLACED + NOT_RUN) == []


def test_run_never_loads_what_it_does_not_use(modules: dict[str, list[str]]) -> None:
    built = modules["after_build"]
    # Sanity: the build did happen and loaded the services.
    for needed in ("vm_agent.xds.proxy", "vm_agent.identity.sds", "vm_agent.dns.server", "grpclib.server"):
        assert needed in built
    assert _loaded(built, LIBRARIES_REPLACED) == []
    assert _loaded(built, NOT_RUN) == []
    assert _loaded(built, ONLY_WHEN_NEEDED) == []
