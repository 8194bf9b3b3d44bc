"""Where the telemetry's per-request cost goes: Envoy CPU per request with parts of it switched off.

The setup of ``bench_telemetry`` (two VM sidecars over mTLS, a ``direct_response`` backend, wrk on core 1, the
Envoys on core 0). Variants, alternating in rounds: **off** (Istio's filters only dropped), **full** (the
stock-filter path), **no stats** (full without the stats access logs), **no exchange** (full without the header
exchange), **native** (what the agent gives the shipped Envoy: the native stats filter in place of the stats
access logs and the outbound metadata rule). The figure is the two sidecars' CPU time (user + system, from
/proc) per request wrk completed, so the machine's share of noise in throughput matters less than in
``bench_telemetry``'s req/s.

    flock /tmp/vm-agent-bench.lock .venv/bin/python -m bench bench_telemetry_parts [--rounds=5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from bench import bench_telemetry as bt
from tests.integration.mesh_xdsgen.support import MeshCa, free_port, running_envoy
from vm_agent.mesh.model import MeshSnapshot, key, parse_documents
from vm_agent.telemetry import filters, rewrite
from vm_agent.telemetry.native.build import build as native_build

RESULTS = Path(__file__).parent / "results" / "telemetry-parts.md"


def _no_exchange() -> dict[str, Any]:
    return {
        "inbound_exchange": lambda *a, **k: [],
        "outbound_exchange": lambda: [],
        "upstream_exchange": lambda *a: [],
        "answer_headers": lambda *a: [],
    }


VARIANTS: dict[str, tuple[bool, dict[str, Any], bool, bool]] = {
    # name: (telemetry on, filters overrides, keep stats access logs, native stats filter)
    "off": (False, {}, True, False),
    "full": (True, {}, True, False),
    "no stats": (True, {}, False, False),
    "no exchange": (True, _no_exchange(), True, False),
    "native": (True, {}, True, True),
}


def native_module(wanted: bool) -> str | None:
    """The native stats filter's module file for a variant that uses it (built here when missing)."""
    if not wanted:
        return None
    path = native_build()
    if path is None:
        raise RuntimeError("the native stats filter could not be built (no C compiler)")
    return str(path)


@contextlib.contextmanager
def _variant(overrides: dict[str, Any], stats: bool) -> Iterator[None]:
    saved = {name: getattr(filters, name) for name in overrides}
    saved_logs: Callable[..., Any] = rewrite._access_logs
    try:
        for name, value in overrides.items():
            setattr(filters, name, value)
        if not stats:
            rewrite._access_logs = lambda dicts: []
        yield
    finally:
        for name, value in saved.items():
            setattr(filters, name, value)
        rewrite._access_logs = saved_logs


def _wrk_count(url: str, seconds: int) -> int:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def run(rounds: int, seconds: int) -> dict[str, list[float]]:
    os.sched_setaffinity(0, {0})
    ca = MeshCa()
    pb, sb, backend_admin = free_port(), free_port(), free_port()
    snap = MeshSnapshot(1, {key(o): o for o in parse_documents(bt.MESH.format(pb=pb, sb=sb), "mesh.yaml")})
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    tmp = Path(tempfile.mkdtemp(prefix="vmtp", dir="/tmp"))
    try:
        (tmp / "backend").mkdir()
        with running_envoy(bt._backend(pb, backend_admin), tmp / "backend"):
            backend = {c.pid for c in psutil.Process().children()}
            for r in range(rounds):
                for name, (on, overrides, stats, native) in VARIANTS.items():
                    work = tmp / f"{r}-{name.replace(' ', '-')}"
                    module = native_module(native)
                    with (
                        _variant(overrides, stats),
                        bt._sidecar(work / "a", snap, ca, "127.0.0.2", "sa-a", on, native=module),
                        bt._sidecar(work / "b", snap, ca, "127.0.0.3", "sa-b", on, native=module),
                    ):
                        url = f"http://127.0.0.1:{sb}/"
                        bt._wrk(url, 1, 16)
                        envoys = [c for c in psutil.Process().children() if c.pid not in backend]
                        before = sum(sum(e.cpu_times()[:2]) for e in envoys)
                        n = _wrk_count(url, seconds)
                        used = sum(sum(e.cpu_times()[:2]) for e in envoys) - before
                    cpu[name].append(1e6 * used / n)
                    print(f"  round {r + 1} {name}: {cpu[name][-1]:.1f} µs/request", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cpu


def report(cpu: dict[str, list[float]], rounds: int, seconds: int) -> str:
    med = {name: statistics.median(xs) for name, xs in cpu.items()}
    off, full = med["off"], med["full"]
    lines = [
        "# Where the telemetry's per-request cost goes",
        "",
        f"`bench/bench_telemetry_parts.py`: the two sidecars' CPU per request, {rounds} rounds of {seconds} s per"
        " variant, medians (setup as `bench_telemetry`).",
        "",
        "| variant | µs / request | over off |",
        "|---|---:|---:|",
    ]
    for name, value in med.items():
        lines.append(f"| {name} | {value:.1f} | {value - off:+.1f} |")
    lines += [
        "",
        f"Stats access logs ≈ {full - med['no stats']:.1f} µs, header exchange ≈ {full - med['no exchange']:.1f} µs"
        f" of the {full - off:.1f} µs the telemetry adds ({(full - off) / full * 100:.0f} % of a request's sidecar"
        " CPU).",
        "",
        "Per round: " + "; ".join(f"{n} " + ", ".join(f"{x:.1f}" for x in xs) for n, xs in cpu.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if a.startswith("--")])
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("wrk and taskset are needed (make system-deps installs them)")
        return 1
    text = report(run(args.rounds, args.seconds), args.rounds, args.seconds)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
