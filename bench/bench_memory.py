"""Where the agent's memory goes (issue 16): the profile behind the RSS row of bench/results/startup.md.

Three views of one ``vm-agent run`` against the local mesh (real Envoy, loopback), taken 2 s after
``/healthz/ready`` first answers 200:

* the agent's RSS split by mapping (``/proc/PID/smaps``: each shared library, the malloc heap, anonymous
  memory), Envoy excluded;
* tracemalloc's view of the same run (a second run, traced from the first instruction): Python allocations
  by the package that made them, and the modules the agent has imported;
* what each third-party package costs on its own: RSS and import time it adds to a fresh interpreter that
  has already imported asyncio (which every one of them needs), one subprocess per package.

``python -m bench bench_memory`` or ``python -m bench.bench_memory``; writes bench/results/memory.md.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "memory.md"
# Everything the agent imported before this work, so the table keeps showing what was removed and why.
PACKAGES = (
    "aiohttp",
    "cryptography.x509",
    "dnslib",
    "envoy.service.discovery.v3.discovery_pb2",
    "google.protobuf.json_format",
    "grpc",
    "grpc_health.v1.health_pb2",
    "grpclib.client",
    "grpclib.server",
    "prometheus_client",
    "psutil",
    "uvloop",
    "yaml",
)


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[key] = int(value.split()[0])
    return out


def smaps_by_mapping(pid: int) -> collections.Counter[str]:
    """RSS (KiB) per mapped file, ``[heap]``, ``[stack]`` or ``[anon]``."""
    by: collections.Counter[str] = collections.Counter()
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if head and "-" in head[0] and not head[0].endswith(":"):
                name = head[5].strip() if len(head) > 5 else "[anon]"
                if name.startswith("[stack"):
                    name = "[stack]"
            elif head and head[0] == "Rss:":
                by[name] += int(head[1])
    return by


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    return path.rsplit("/", 1)[-1] if path.startswith("/") else path


# --- the traced agent: runs inside the agent's own process (``--traced``) ----------------------------------


def _traced_main(out: str, ready_url: str, argv: list[str]) -> int:
    """Run ``vm-agent <argv>`` with tracemalloc on; 2 s after readiness, write the profile to ``out`` and stop."""
    import signal
    import threading
    import tracemalloc
    import urllib.request

    tracemalloc.start(1)

    def watch() -> None:
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        time.sleep(2)
        snap = tracemalloc.take_snapshot()
        by_package: collections.Counter[str] = collections.Counter()
        for stat in snap.statistics("filename"):
            filename = stat.traceback[0].filename
            if "site-packages/" in filename:
                key = filename.split("site-packages/", 1)[1].split("/", 1)[0]
            elif "/vm_agent/" in filename:
                key = "vm_agent." + filename.split("/vm_agent/", 1)[1].split("/", 1)[0].removesuffix(".py")
            elif filename.startswith("<frozen importlib"):
                key = "import machinery (code objects, module dicts)"
            else:
                key = "stdlib " + filename.rsplit("/", 1)[-1]
            by_package[key] += stat.size
        modules = sorted(m for m in sys.modules if not m.startswith(("tracemalloc", "urllib", "bench")))
        doc = {
            "traced_bytes": sum(by_package.values()),
            "by_package": by_package.most_common(25),
            "modules": modules,
        }
        Path(out).write_text(json.dumps(doc))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    from vm_agent.cli import main

    return main(argv)


# --- the measurements ----------------------------------------------------------------------------------------


async def _run_agent(tmp: Path, *, traced_to: Path | None) -> dict[str, Any]:
    from tests.helpers.agent import AgentProcess, sample_manifests, write_vm_files
    from tests.helpers.mesh import running_mesh
    from tests.helpers.net import free_port

    async with running_mesh(tmp) as mesh:
        app_port, svc_port = free_port(), free_port()
        mesh.apply_yaml(sample_manifests(app_port=app_port, service_port=svc_port), source="bench")
        files = write_vm_files(mesh, namespace="vmns", group="vmapp", out=tmp / "files", internal_ip="127.0.9.4")
        agent = AgentProcess(files, instance_ip="127.0.9.4")
        if traced_to is not None:
            argv = agent.command()[3:]
            ready = agent.status_url + "/healthz/ready"
            agent.command = lambda: [  # type: ignore[method-assign]
                sys.executable,
                "-m",
                "bench.bench_memory",
                "--traced",
                str(traced_to),
                ready,
                *argv,
            ]
        agent.start()
        try:
            assert agent.proc is not None
            deadline = time.monotonic() + 60
            if traced_to is not None:
                while agent.proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                return json.loads(traced_to.read_text()) if traced_to.exists() else {}
            while not await asyncio.to_thread(agent.ready):
                if time.monotonic() > deadline or agent.proc.poll() is not None:
                    raise RuntimeError("agent did not get ready:\n" + agent.log()[-3000:])
                await asyncio.sleep(0.02)
            await asyncio.sleep(2)
            pid = agent.proc.pid
            return {"status": _status_kib(pid), "smaps": smaps_by_mapping(pid).most_common(18)}
        finally:
            agent.cleanup()


_IMPORT_PROBE = """
import importlib, sys, time
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
import asyncio
before, t = rss(), time.perf_counter()
importlib.import_module(sys.argv[1])
print(rss() - before, time.perf_counter() - t, len(sys.modules))
"""


def import_costs() -> list[tuple[str, float, float]]:
    """(package, RSS MiB, import ms) each package adds on top of asyncio; median of three fresh interpreters."""
    rows = []
    for name in PACKAGES:
        samples = []
        for _ in range(3):
            out = subprocess.run(
                [sys.executable, "-c", _IMPORT_PROBE, name], capture_output=True, text=True, check=True, cwd=REPO
            )
            kib, seconds, _ = out.stdout.split()
            samples.append((int(kib) / 1024, float(seconds) * 1000))
        samples.sort(key=lambda s: s[1])
        rss = sorted(s[0] for s in samples)[1]
        rows.append((name, rss, samples[1][1]))
    return rows


def report(plain: dict[str, Any], traced: dict[str, Any], costs: list[tuple[str, float, float]]) -> str:
    st = plain["status"]
    lines = [
        "# Where the agent's memory goes (bench/bench_memory.py)",
        "",
        "One `vm-agent run` against the local mesh, 2 s after `/healthz/ready` first answered 200 (Envoy excluded).",
        "",
        f"RSS {st['VmRSS'] / 1024:.1f} MiB: anonymous {st['RssAnon'] / 1024:.1f} MiB, file-backed "
        f"{st['RssFile'] / 1024:.1f} MiB; {st['Threads']} threads.",
        "",
        "| mapping | RSS (MiB) |",
        "|---|---:|",
    ]
    lines += [f"| {_short(name)} | {kib / 1024:.1f} |" for name, kib in plain["smaps"]]
    modules = traced.get("modules", [])
    tops = sorted({m.split(".", 1)[0] for m in modules})
    lines += [
        "",
        f"tracemalloc (a second, traced run): {traced.get('traced_bytes', 0) / 2**20:.1f} MiB of Python allocations, "
        f"{len(modules)} modules imported.",
        "",
        "| allocated by | MiB |",
        "|---|---:|",
    ]
    lines += [f"| {key} | {size / 2**20:.2f} |" for key, size in traced.get("by_package", [])]
    lines += [
        "",
        "Top-level packages in the agent's `sys.modules`: "
        + ", ".join(f"`{t}`" for t in tops if not t.startswith("_")),
        "",
        "What each package adds to a fresh interpreter that already imported asyncio (median of 3):",
        "",
        "| package | RSS (MiB) | import (ms) | imported by `vm-agent run` |",
        "|---|---:|---:|---|",
    ]
    loaded = set(modules)
    lines += [f"| `{name}` | {rss:.1f} | {ms:.0f} | {'yes' if name in loaded else 'no'} |" for name, rss, ms in costs]
    return "\n".join(lines) + "\n"


async def run() -> str:
    with tempfile.TemporaryDirectory(prefix="bm", dir="/tmp") as tmp:
        plain = await _run_agent(Path(tmp), traced_to=None)
    with tempfile.TemporaryDirectory(prefix="bm", dir="/tmp") as tmp:
        traced = await _run_agent(Path(tmp), traced_to=Path(tmp) / "traced.json")
    return report(plain, traced, await asyncio.to_thread(import_costs))


def main() -> int:
    table = asyncio.run(run())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--traced":
        raise SystemExit(_traced_main(sys.argv[2], sys.argv[3], sys.argv[4:]))
    raise SystemExit(main())
