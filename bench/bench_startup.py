"""Start-up and memory of the whole agent against the local mesh (issue 5 bench).

* time from ``vm-agent run`` to Envoy LIVE, and to ``/healthz/ready`` (certificate issued, config and
  NameTable applied);
* the agent's RSS (Envoy excluded) after start and after a 10,000-entry NameTable;
* the named peer in the same run: Istio's own ``pilot-agent`` (built by tests/interop into the interop
  cache) started against the same mesh with the same files, when that binary is present.

pilot-agent passes istiod's configuration to Envoy untouched and the only Envoy here is stock Envoy, which
refuses the istio-proxy-only filters a default istiod (and the local mesh, by default) adds; so pilot-agent
runs against the local mesh with those filters off (``istio_telemetry=False``). vm-agent runs both ways in
the same rounds: against that same mesh (the like-for-like row the ratios use) and against the default mesh,
where it also rewrites those filters for stock Envoy. Rounds alternate the three runs.

Everything runs on loopback. Writes bench/results/startup.md.
"""

from __future__ import annotations

import asyncio
import json
import os
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

from bench.pilot_agent import PILOT_AGENT, pilot_agent  # noqa: E402
from tests.helpers.agent import AgentProcess, sample_manifests, write_vm_files  # noqa: E402
from tests.helpers.mesh import running_mesh  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "startup.md"
RUNS = int(os.environ.get("BENCH_STARTUP_RUNS", "5"))
NAMES = int(os.environ.get("BENCH_NAMETABLE_ENTRIES", "10000"))


# Where a vm-agent start spends its time: the first log line of each step, as ms after ``vm-agent run``.
MILESTONES = (
    ("starting", "Python up, configuration read"),
    ("started Envoy", "Envoy spawned"),
    ("asking the CA", "CSR on its way (identity is built first)"),
    ("xDS proxy listening", "every service built (imports done)"),
    ("opened delta stream", "Envoy's first xDS stream"),
    ("connected for secrets", "Envoy asks for its certificate"),
    ("using ca certificate", "certificate issued"),
    ("readiness: ready", "/healthz/ready would answer 200"),
)


def milestones(log: str, started: float) -> dict[str, float]:
    import datetime

    out: dict[str, float] = {}
    for line in log.splitlines():
        stamp = line.split("\t", 1)[0]
        for marker, _ in MILESTONES:
            if marker in line and marker not in out:
                try:
                    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
                except ValueError:
                    continue
                out[marker] = when.timestamp() - started
    return out


# What `vm-agent run` imports before it is ready (the modules its start loads, the rewrite included).
_RUN_IMPORTS = (
    "vm_agent.cli, vm_agent.agent, vm_agent.identity.manager, vm_agent.identity.sds, vm_agent.xds, vm_agent.dns, "
    "vm_agent.status, vm_agent.health, vm_agent.telemetry, vm_agent.telemetry.rewrite"
)


def import_profile(tries: int = 3) -> list[tuple[str, float]]:
    """Import time by package (self time summed, best of ``tries`` fresh interpreters), largest first."""
    best: dict[str, float] = {}
    for _ in range(tries):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {_RUN_IMPORTS}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        totals: dict[str, float] = {}
        for line in out.stderr.splitlines():
            if not line.startswith("import time:") or line.count("|") != 2 or "self [us]" in line:
                continue
            own, _, name = line.removeprefix("import time:").split("|")
            name = name.strip()
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] == "vm_agent" and len(parts) > 1 else parts[0]
            totals[key] = totals.get(key, 0.0) + int(own) / 1000
        for key, ms in totals.items():
            best[key] = min(best.get(key, ms), ms)
    return sorted(best.items(), key=lambda kv: -kv[1])


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


async def one_run(tmp: Path, measure_memory: bool, *, istio_telemetry: bool = True) -> dict[str, float]:
    async with running_mesh(tmp, istio_telemetry=istio_telemetry) as mesh:
        app_port, svc_port = free_port(), free_port()
        mesh.apply_yaml(sample_manifests(app_port=app_port, service_port=svc_port), source="bench")
        files = write_vm_files(mesh, namespace="vmns", group="vmapp", out=tmp / "files", internal_ip="127.0.9.2")
        agent = AgentProcess(files, instance_ip="127.0.9.2")
        started = time.time()
        agent.start()
        try:
            try:
                live = await _until(agent.envoy_live, 60)
            except TimeoutError:
                print(agent.log()[-4000:], file=sys.stderr)
                raise
            ready = await _until(agent.ready, 60) + live
            out = {"live_s": live, "ready_s": ready}
            out.update({f"at:{k}": v for k, v in milestones(agent.log(), started).items()})
            assert agent.proc is not None
            await asyncio.sleep(2)
            out["rss_start_mb"] = _rss_mb(agent.proc.pid)
            if measure_memory:
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


async def pilot_agent_run(tmp: Path) -> dict[str, float] | None:
    """Istio's agent with the same files against the same mesh, to the same two milestones."""
    if not PILOT_AGENT.exists():
        return None
    async with running_mesh(tmp, istio_telemetry=False) as mesh:
        app_port, svc_port = free_port(), free_port()
        mesh.apply_yaml(sample_manifests(app_port=app_port, service_port=svc_port), source="bench")
        files = write_vm_files(mesh, namespace="vmns", group="vmapp", out=tmp / "files", internal_ip="127.0.9.3")
        try:
            with pilot_agent(mesh, files, instance_ip="127.0.9.3") as agent:
                try:
                    t_live = await _until(agent.live, 60)
                    t_ready = await _until(agent.ready, 60) + t_live
                except TimeoutError:
                    print(agent.log_tail(), file=sys.stderr)
                    return None
                await asyncio.sleep(2)
                return {"live_s": t_live, "ready_s": t_ready, "rss_start_mb": _rss_mb(agent.pid)}
        except FileNotFoundError as err:
            print(f"bench_startup: no pilot-agent run: {err}", file=sys.stderr)
            return None


async def run() -> str:
    rows: list[dict[str, float]] = []
    plain: list[dict[str, float]] = []
    peer: list[dict[str, float]] = []
    for i in range(RUNS):
        with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as tmp:
            plain.append(await one_run(Path(tmp), measure_memory=False, istio_telemetry=False))
        with tempfile.TemporaryDirectory(prefix="bp", dir="/tmp") as tmp:
            result = await pilot_agent_run(Path(tmp))
            if result is not None:
                peer.append(result)
        with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as tmp:
            rows.append(await one_run(Path(tmp), measure_memory=i == 0))

    imports = await asyncio.to_thread(import_profile)

    def median(values: list[dict[str, float]], key: str) -> float | None:
        xs = [r[key] for r in values if key in r]
        return statistics.median(xs) if xs else None

    def med(values: list[dict[str, float]], key: str) -> str:
        m = median(values, key)
        return "n/a" if m is None else f"{m:.2f}"

    def ratio(key: str) -> str:
        ours, theirs = median(plain, key), median(peer, key)
        return "n/a" if ours is None or not theirs else f"{ours / theirs:.2f}x"

    lines = [
        "# Agent start-up and memory (bench/bench_startup.py)",
        "",
        f"{RUNS} rounds, each running vm-agent (mesh without istio-proxy filters), pilot-agent (same mesh, same "
        "files) and vm-agent (default mesh, filters rewritten for stock Envoy) one after the other; loopback, local "
        "mesh in the benchmark's process; medians.",
        "",
        "| measure | vm-agent | pilot-agent | ratio | vm-agent, default mesh |",
        "|---|---:|---:|---:|---:|",
        f"| `run` → Envoy LIVE (s) | {med(plain, 'live_s')} | {med(peer, 'live_s')} | {ratio('live_s')} | "
        f"{med(rows, 'live_s')} |",
        f"| `run` → /healthz/ready 200 (cert + config + NameTable) (s) | {med(plain, 'ready_s')} | "
        f"{med(peer, 'ready_s')} | {ratio('ready_s')} | {med(rows, 'ready_s')} |",
        f"| agent RSS after start, Envoy excluded (MiB) | {med(plain, 'rss_start_mb')} | {med(peer, 'rss_start_mb')} | "
        f"{ratio('rss_start_mb')} | {med(rows, 'rss_start_mb')} |",
        f"| agent RSS with a {NAMES:,}-entry NameTable (MiB) | | not measured | | {med(rows, 'rss_nametable_mb')} |",
        f"| {NAMES:,}-entry NameTable: apply → DNS table loaded (s) | | | | {med(rows, 'nametable_apply_s')} |",
        "",
        "pilot-agent column: " + ("measured" if peer else f"no run reached ready ({PILOT_AGENT})"),
        "",
        "Where vm-agent's start goes (like-for-like runs, from its own log; ms after `vm-agent run`, medians):",
        "",
        "| step | ms |",
        "|---|---:|",
        *(
            f"| {what} | {1000 * m:.0f} |"
            for marker, what in MILESTONES
            if (m := median(plain, f"at:{marker}")) is not None
        ),
        "",
        "What those imports cost (`python -X importtime`, self time by package, best of 3; "
        f"{sum(ms for _, ms in imports):.0f} ms in all):",
        "",
        "| package | ms |",
        "|---|---:|",
        *(f"| `{name}` | {ms:.1f} |" for name, ms in imports[:15]),
        "",
        "Raw: " + json.dumps({"vm_agent": plain, "pilot_agent": peer, "vm_agent_default_mesh": rows}),
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
