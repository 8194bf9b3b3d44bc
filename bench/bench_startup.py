"""Start-up and memory of the whole agent against the local mesh (issue 5 bench).

* time from ``vm-agent run`` to Envoy LIVE, and to ``/healthz/ready`` (certificate issued, config and
  NameTable applied);
* the agent's RSS (Envoy excluded) after start and after a 10,000-entry NameTable;
* the named peer in the same run: Istio's own ``pilot-agent`` (built by tests/interop into the interop
  cache) started against the same mesh with the same files, when that binary is present.

Everything runs on loopback. Writes bench/results/startup.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.agent import AgentProcess, sample_manifests, write_vm_files  # noqa: E402
from tests.helpers.mesh import running_mesh  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "startup.md"
RUNS = int(os.environ.get("BENCH_STARTUP_RUNS", "5"))
NAMES = int(os.environ.get("BENCH_NAMETABLE_ENTRIES", "10000"))
INTEROP_CACHE = Path(os.environ.get("VM_AGENT_INTEROP_CACHE", Path.home() / ".cache/vm-agent-interop"))
PILOT_AGENT = INTEROP_CACHE / "bin/pilot-agent"


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _service_entries(n: int) -> str:
    docs = []
    for i in range(n):
        docs.append(
            f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bulk-{i}, namespace: vmns}}
spec:
  hosts: [svc{i}.bulk.example]
  addresses: [240.1.{i // 250}.{i % 250 + 1}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
"""
        )
    return "---\n".join(docs)


async def _until(check: Any, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await asyncio.to_thread(check):
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise TimeoutError


async def one_run(tmp: Path, measure_memory: bool) -> dict[str, float]:
    async with running_mesh(tmp) as mesh:
        app_port, svc_port = free_port(), free_port()
        mesh.apply_yaml(sample_manifests(app_port=app_port, service_port=svc_port), source="bench")
        files = write_vm_files(mesh, namespace="vmns", group="vmapp", out=tmp / "files", internal_ip="127.0.9.2")
        agent = AgentProcess(files, instance_ip="127.0.9.2")
        t0 = time.monotonic()
        agent.start()
        try:
            try:
                live = await _until(agent.envoy_live, 60)
            except TimeoutError:
                print(agent.log()[-4000:], file=sys.stderr)
                raise
            ready = await _until(agent.ready, 60) + live
            out = {"live_s": live, "ready_s": ready}
            if measure_memory:
                assert agent.proc is not None
                await asyncio.sleep(2)
                out["rss_start_mb"] = _rss_mb(agent.proc.pid)
                mesh.apply_yaml(_service_entries(NAMES), source="bench")

                def loaded() -> bool:
                    dns = agent.status().get("dns") or {}
                    return int(dns.get("table_entries", 0)) >= NAMES

                out["nametable_apply_s"] = await _until(loaded, 120)
                await asyncio.sleep(2)
                out["rss_nametable_mb"] = _rss_mb(agent.proc.pid)
            return out
        finally:
            agent.cleanup()
            _ = t0


def _istio_bootstrap_template() -> Path | None:
    """pilot-agent renders Envoy's bootstrap from the template istio-sidecar ships; take it from the Go module
    cache the interop build filled (never committed here)."""
    pin = INTEROP_CACHE / "bin" / "pilot-discovery.pin"
    version = pin.read_text().split()[0] if pin.exists() else "v0.0.0-20260827124520-eed52ebb66ad"
    try:
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"istio.io/istio@{version}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"},
        )
        folder = Path(json.loads(out.stdout)["Dir"])
    except (OSError, subprocess.SubprocessError, KeyError, ValueError):
        return None
    template = folder / "tools/packaging/common/envoy_bootstrap.json"
    return template if template.exists() else None


async def pilot_agent_run(tmp: Path) -> dict[str, float] | None:
    """Istio's agent with the same files against the same mesh, to the same two milestones."""
    if not PILOT_AGENT.exists():
        return None
    async with running_mesh(tmp) as mesh:
        app_port, svc_port = free_port(), free_port()
        mesh.apply_yaml(sample_manifests(app_port=app_port, service_port=svc_port), source="bench")
        files = write_vm_files(mesh, namespace="vmns", group="vmapp", out=tmp / "files", internal_ip="127.0.9.3")
        root = Path(tempfile.mkdtemp(prefix="pa", dir="/tmp"))
        try:
            for sub in ("etc/certs", "var/run/secrets/tokens", "etc/istio/config", "etc/istio/proxy"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(files / "root-cert.pem", root / "etc/certs/root-cert.pem")
            shutil.copy(files / "istio-token", root / "var/run/secrets/tokens/istio-token")
            shutil.copy(files / "mesh.yaml", root / "etc/istio/config/mesh")
            template = _istio_bootstrap_template()
            if template is None:
                return None
            (root / "var/lib/istio/envoy").mkdir(parents=True, exist_ok=True)
            shutil.copy(template, root / "var/lib/istio/envoy/envoy_bootstrap_tmpl.json")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG"))}
            for line in (files / "cluster.env").read_text().splitlines():
                key, _, value = line.partition("=")
                env[key] = value.strip("'")
            admin, status = free_port(), free_port()
            from vm_agent.envoy_binary import find_envoy_binary

            port = mesh.xds_address.rsplit(":", 1)[1]
            env.update(
                {
                    "INSTANCE_IP": "127.0.9.3",
                    "POD_NAME": "vm1",
                    "POD_NAMESPACE": "vmns",
                    "PROV_CERT": "./etc/certs",
                    "OUTPUT_CERTS": "./etc/certs",
                    "CA_ADDR": f"localhost:{port}",
                    "PROXY_CONFIG": (
                        f"discoveryAddress: localhost:{port}\nproxyAdminPort: {admin}\nstatusPort: {status}\n"
                        f"binaryPath: {find_envoy_binary()}\ninterceptionMode: NONE\n"
                    ),
                    "DNS_PROXY_ADDR": f"127.0.0.1:{free_port()}",
                    "ENVOY_STATUS_PORT": str(free_port()),
                    "ENVOY_PROMETHEUS_PORT": str(free_port()),
                    "CLOUD_PLATFORM": "none",
                }
            )
            log = (root / "pilot-agent.log").open("wb")
            proc = subprocess.Popen(
                [str(PILOT_AGENT), "proxy", "sidecar"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                from urllib.request import urlopen

                def live() -> bool:
                    try:
                        with urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                            return bool(r.read().strip() == b"LIVE")
                    except OSError:
                        return False

                def ready() -> bool:
                    try:
                        with urlopen(f"http://127.0.0.1:{status}/healthz/ready", timeout=1) as r:
                            return int(r.status) == 200
                    except OSError:
                        return False

                t_live = await _until(live, 60)
                t_ready = await _until(ready, 60) + t_live
                await asyncio.sleep(2)
                return {"live_s": t_live, "ready_s": t_ready, "rss_start_mb": _rss_mb(proc.pid)}
            except TimeoutError:
                print((root / "pilot-agent.log").read_text()[-3000:], file=sys.stderr)
                return None
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            shutil.rmtree(root, ignore_errors=True)


async def run() -> str:
    rows: list[dict[str, float]] = []
    peer: list[dict[str, float]] = []
    for i in range(RUNS):
        with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as tmp:
            rows.append(await one_run(Path(tmp), measure_memory=i == 0))
        with tempfile.TemporaryDirectory(prefix="bp", dir="/tmp") as tmp:
            result = await pilot_agent_run(Path(tmp))
            if result is not None:
                peer.append(result)

    def med(values: list[dict[str, float]], key: str) -> str:
        xs = [r[key] for r in values if key in r]
        return f"{statistics.median(xs):.2f}" if xs else "n/a"

    lines = [
        "# Agent start-up and memory (bench/bench_startup.py)",
        "",
        f"{RUNS} runs, loopback, local mesh in the same process as the benchmark; medians.",
        "",
        "| measure | vm-agent | pilot-agent (same mesh, same files) |",
        "|---|---|---|",
        f"| `run` → Envoy LIVE (s) | {med(rows, 'live_s')} | {med(peer, 'live_s')} |",
        f"| `run` → /healthz/ready 200 (cert + config + NameTable) (s) | {med(rows, 'ready_s')} | "
        f"{med(peer, 'ready_s')} |",
        f"| agent RSS after start, Envoy excluded (MiB) | {med(rows, 'rss_start_mb')} | {med(peer, 'rss_start_mb')} |",
        f"| agent RSS with a {NAMES:,}-entry NameTable (MiB) | {med(rows, 'rss_nametable_mb')} | not measured |",
        f"| {NAMES:,}-entry NameTable: apply → DNS table loaded (s) | {med(rows, 'nametable_apply_s')} | |",
        "",
        "pilot-agent column: " + ("measured" if peer else f"binary not found at {PILOT_AGENT} (run make interop)"),
        "",
        "Raw: " + json.dumps({"vm_agent": rows, "pilot_agent": peer}),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    table = asyncio.run(run())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
