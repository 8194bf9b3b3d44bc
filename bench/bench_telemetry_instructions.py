"""The telemetry's per-request cost in instructions: deterministic, where req/s on this shared machine is not.

``bench_telemetry``'s throughput moves by several points between runs of one build (the host's load shows through
the VM), too much to see a change of a few per cent. Here the two VM sidecars of ``bench_telemetry`` (same
configuration, same exchange header) run under valgrind's callgrind, instrumentation switched on only after
warm-up; a fixed number of keep-alive requests goes through them, and the instructions each sidecar executed are
divided by the requests. The variants of ``bench_telemetry_parts`` (off, full, no stats, no exchange, native)
split the cost. Instructions are not time: the kernel's share (sockets) is not counted, and valgrind's CPU model makes
byte-proportional work (TLS records, so the header exchange) look dearer than it is. Use it to compare builds.

    .venv/bin/python -m bench bench_telemetry_instructions [--requests=500]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import bench_telemetry as bt
from bench.bench_telemetry_parts import VARIANTS, _variant, native_module
from tests.integration.mesh_xdsgen.support import MeshCa, free_port, running_envoy
from vm_agent.mesh.model import MeshSnapshot, key, parse_documents

RESULTS = Path(__file__).parent / "results" / "telemetry-instructions.md"
SIDECARS = (("a", "127.0.0.2", "sa-a"), ("b", "127.0.0.3", "sa-b"))


def _drive(port: int, requests: int) -> None:
    """Keep-alive GETs over two connections, each answered before the next is sent."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(2)]
    try:
        for i in range(requests):
            c = conns[i % 2]
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"request {i} got {r.status}")
    finally:
        for c in conns:
            c.close()


def _callgrind_pid(work: Path) -> int:
    """The valgrind process running the sidecar whose files are in ``work``."""
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(str(work) in arg for arg in p.cmdline()):
                return p.pid
    raise RuntimeError(f"no sidecar process for {work}")


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True, timeout=60)


def _exporter(dump: str) -> int:
    """Instructions of the native filter's exporter thread in a dump: it writes once a second, so under
    valgrind's slowness it would be charged to a few hundred requests instead of the thousands of a real second."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", dump], capture_output=True, text=True, timeout=120, check=False
    ).stdout
    m = re.search(r"^\s*([\d,]+)\s.*:exporter \[", out, re.M)
    return int(m.group(1).replace(",", "")) if m else 0


def _instructions(pid: int, work: Path) -> tuple[int, int]:
    """Dump the counters since the last zeroing: (all instructions, the exporter thread's)."""
    _control("-d", str(pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name in glob.glob(f"{work}/callgrind.out.{pid}.*"):
            for line in Path(name).read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1]), _exporter(name)
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump for {pid}")


def run(requests: int) -> dict[str, tuple[float, float]]:
    ca = MeshCa()
    pb, sb, backend_admin = free_port(), free_port(), free_port()
    snap = MeshSnapshot(1, {key(o): o for o in parse_documents(bt.MESH.format(pb=pb, sb=sb), "mesh.yaml")})
    out: dict[str, tuple[float, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="vmti", dir="/tmp"))
    try:
        (tmp / "backend").mkdir()
        with running_envoy(bt._backend(pb, backend_admin), tmp / "backend"):
            for name, (on, overrides, stats, native) in VARIANTS.items():
                work = tmp / name.replace(" ", "-")
                module = native_module(native)
                with _variant(overrides, stats), contextlib.ExitStack() as stack:
                    dirs = []
                    for side, ip, sa in SIDECARS:
                        side_work = work / side
                        side_work.mkdir(parents=True)
                        prefix = (
                            "valgrind",
                            "--tool=callgrind",
                            "--instr-atstart=no",
                            f"--log-file={side_work}/vg.log",
                            f"--callgrind-out-file={side_work}/callgrind.out.%p",
                        )
                        stack.enter_context(bt._sidecar(side_work, snap, ca, ip, sa, on, prefix=prefix, native=module))
                        dirs.append(side_work)
                    pids = [_callgrind_pid(d) for d in dirs]
                    _drive(sb, 50)  # connections, TLS sessions, stats series: everything a steady state has
                    for pid in pids:
                        _control("-i", "on", str(pid))
                    _drive(sb, 20)
                    for pid in pids:
                        _control("-z", str(pid))
                    _drive(sb, requests)
                    counted = [_instructions(pid, d) for pid, d in zip(pids, dirs, strict=True)]
                    a, b = ((total - export) / requests for total, export in counted)
                    if any(export for _, export in counted):
                        print(f"  {name}: the exporter thread's {sum(e for _, e in counted) / 1000:.0f}k left out")
                out[name] = (a, b)
                print(f"  {name}: client sidecar {a / 1000:.1f}k, server sidecar {b / 1000:.1f}k instructions/request")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def report(result: dict[str, tuple[float, float]], requests: int) -> str:
    off = sum(result["off"])
    lines = [
        "# The telemetry's per-request cost in instructions",
        "",
        f"`bench/bench_telemetry_instructions.py`: the two VM sidecars of `bench_telemetry` under callgrind,"
        f" {requests} keep-alive requests after warm-up, instructions per request (user space only; deterministic"
        " to about 1 %).",
        "",
        "| variant | client sidecar (outbound) | server sidecar (inbound) | both | over off |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (a, b) in result.items():
        both = a + b
        lines.append(f"| {name} | {a / 1000:.1f}k | {b / 1000:.1f}k | {both / 1000:.1f}k | {both / off - 1:+.1%} |")
    full, no_stats, no_exchange = (sum(result[n]) for n in ("full", "no stats", "no exchange"))
    lines += [
        "",
        f"Stats access logs ≈ {(full - no_stats) / 1000:.1f}k, header exchange ≈ {(full - no_exchange) / 1000:.1f}k of"
        f" the {(full - off) / 1000:.1f}k instructions the stock-filter path (**full**) adds per request (the"
        " exchange's share is overstated: valgrind's TLS is dearer per byte).",
    ]
    if "native" in result:
        native = sum(result["native"])
        lines.append(
            f"**native** (the agent's default with the shipped Envoy: the native stats filter, which also takes the"
            f" outbound answer) adds {(native - off) / 1000:.1f}k: {(full - native) / 1000:.1f}k less than **full**."
            " Its exporter thread is left out: it writes the histograms once a second, which valgrind's slowness"
            " would charge to the few hundred requests of a valgrind second instead of a real second's thousands."
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if a.startswith("--")])
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is needed (make system-deps installs it)")
        return 1
    text = report(run(args.requests), args.requests)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
