"""DNS proxy vs dnsmasq: QPS and latency for table hits (1,000 and 100,000 names) and forwarded names.

Both servers run at the same time, pinned to core 0; dnsperf (and the upstream dnsmasq that
forwarded names go to) run on core 1.  dnsmasq serves the same names from a hosts file.  dnsperf
alternates between the servers: saturating runs (100 queries outstanding) for QPS, then runs at a
fixed rate both sustain, with per-query latencies (``-v``) for p50/p99.

Needs root-free tools from Debian: ``apt-get install -y dnsperf dnsmasq`` (taskset is util-linux).
Writes bench/results/dns.md.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "dns.md"
SERVER_CORE = "0"
CLIENT_CORE = "1"
DURATION = float(os.environ.get("BENCH_DNS_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_DNS_ROUNDS", "5"))
FIXED_RATE = int(os.environ.get("BENCH_DNS_RATE", "10000"))
UPSTREAM_HOST = "127.0.0.3"
FORWARDED_NAMES = 1000


def free_port(host: str) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def mesh_ip(i: int) -> str:
    # Same scheme as bench/dns/serve.py's NameTable.
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def wait_udp(port: int, name: str, timeout: float = 120.0) -> None:
    """Until the server on 127.0.0.1:port answers a query for ``name``."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            try:
                reply = s.recv(4096)
                # An answer with records: a forwarded NXDOMAIN before the table is loaded is no proof.
                if reply[:2] == b"\x12\x34" and reply[6:8] != b"\x00\x00":
                    return
            except OSError:
                time.sleep(0.2)
    raise TimeoutError(f"server on port {port} did not answer {name}")


@dataclass
class Run:
    qps: float
    lost: float
    p50_ms: float
    p99_ms: float


def dnsperf(port: int, queries: Path, rate: int | None, verbose: bool) -> tuple[float, float, list[float]]:
    cmd = ["taskset", "-c", CLIENT_CORE, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries)]
    cmd += ["-l", str(DURATION), "-q", "100", "-t", "2"]
    if rate:
        cmd += ["-Q", str(rate)]
    if verbose:
        cmd += ["-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lost = float(re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out).group(1))  # type: ignore[union-attr]
    latencies = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("> ")]
    return qps, lost, latencies


def measure(ports: dict[str, int], queries: Path) -> dict[str, Run]:
    """Alternate the servers run by run, so a load change on the shared machine hits both alike."""
    qps: dict[str, list[float]] = {name: [] for name in ports}
    lost: dict[str, list[float]] = {name: [] for name in ports}
    lat: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(ROUNDS):
        for name, port in ports.items():
            q, loss, _ = dnsperf(port, queries, None, False)
            qps[name].append(q)
            lost[name].append(loss)
    for _ in range(2):
        for name, port in ports.items():
            lat[name] += dnsperf(port, queries, FIXED_RATE, True)[2]
    out: dict[str, Run] = {}
    for name in ports:
        times = sorted(lat[name])
        p50 = statistics.median(times) * 1e3 if times else float("nan")
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3 if times else float("nan")
        out[name] = Run(statistics.median(qps[name]), max(lost[name]), p50, p99)
    return out


def start(cmd: list[str], core: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", core, *cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dnsmasq(port: int, host: str, hosts: Path | None, upstream: int | None, cache: bool) -> list[str]:
    cmd = ["dnsmasq", "--keep-in-foreground", f"--port={port}", f"--listen-address={host}", "--bind-interfaces"]
    cmd += ["--no-resolv", "--no-hosts", "--user=root", "--pid-file=", "--log-facility=/dev/null"]
    cmd += ["--dns-forward-max=1000"]
    if hosts is not None:
        cmd.append(f"--addn-hosts={hosts}")
    if upstream is not None:
        cmd.append(f"--server={UPSTREAM_HOST}#{upstream}")
    if not cache:
        cmd.append("--cache-size=0")
    return cmd


def serve_cmd(port: int, names: int, up_port: int) -> list[str]:
    return [sys.executable, "-m", "bench.dns.serve", str(port), str(names), UPSTREAM_HOST, str(up_port)]


def main() -> int:
    missing = [tool for tool in ("dnsperf", "dnsmasq", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"bench_dns: missing {', '.join(missing)} (apt-get install -y dnsperf dnsmasq)", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, Run]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        work = Path(tmp)
        up_hosts = work / "upstream.hosts"
        up_hosts.write_text("".join(f"192.0.2.{i % 250 + 1} fwd{i}.bench.test\n" for i in range(FORWARDED_NAMES)))
        up_port = free_port(UPSTREAM_HOST)
        upstream = start(dnsmasq(up_port, UPSTREAM_HOST, up_hosts, None, True), CLIENT_CORE)
        try:
            cases: list[tuple[str, int, Path]] = []
            for names in (1000, 100_000):
                q = work / f"hits{names}.txt"
                q.write_text("".join(f"svc{i}.bench.mesh A\n" for i in range(names)))
                cases.append((f"table hit, {names:,} names", names, q))
            fq = work / "forward.txt"
            fq.write_text("".join(f"fwd{i}.bench.test A\n" for i in range(FORWARDED_NAMES)))
            cases.append(("forwarded (upstream dnsmasq)", 1000, fq))
            for label, names, queries in cases:
                forwarded = queries is fq
                hosts = work / f"mesh{names}.hosts"
                hosts.write_text("".join(f"{mesh_ip(i)} svc{i}.bench.mesh\n" for i in range(names)))
                probe = "fwd1.bench.test" if forwarded else "svc1.bench.mesh"
                ports = {"dnsmasq": free_port("127.0.0.1"), "vm-agent": free_port("127.0.0.1")}
                procs = [
                    start(dnsmasq(ports["dnsmasq"], "127.0.0.1", hosts, up_port, cache=not forwarded), SERVER_CORE),
                    start(serve_cmd(ports["vm-agent"], names, up_port), SERVER_CORE),
                ]
                try:
                    for port in ports.values():
                        wait_udp(port, probe)
                    runs = measure(ports, queries)
                finally:
                    for proc in procs:
                        stop(proc)
                for server, run in runs.items():
                    print(f"{label:32} {server:9} {run.qps:8.0f} qps p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms")
                    rows.append((label, server, run))
        finally:
            stop(upstream)
    write_results(rows)
    return 0


def write_results(rows: list[tuple[str, str, Run]]) -> None:
    base = {label: run for label, server, run in rows if server == "dnsmasq"}
    lines = [
        "# DNS proxy vs dnsmasq",
        "",
        f"Generated by `python -m bench bench_dns` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (the machine is shared, "
        "runs vary 10-25 %: read the ratios, same run).",
        f"Servers pinned to core {SERVER_CORE}, dnsperf and the upstream dnsmasq to core {CLIENT_CORE}. "
        f"QPS: median of {ROUNDS} dnsperf runs per server, alternating servers, saturating "
        f"(100 queries outstanding), {DURATION:g} s each. "
        f"Latency: two more runs per server at a fixed {FIXED_RATE:,} QPS, per-query times from `-v`.",
        "dnsmasq serves the mesh names from a hosts file; for forwarded names its cache is off "
        "(`--cache-size=0`), like the proxy, which never caches upstream answers.",
        "",
        "| case | server | QPS | QPS vs dnsmasq | lost % | p50 ms | p99 ms | p99 vs dnsmasq |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, server, run in rows:
        ref = base[label]
        lines.append(
            f"| {label} | {server} | {run.qps:,.0f} | {run.qps / ref.qps:.2f}x | {run.lost:.2f} | "
            f"{run.p50_ms:.3f} | {run.p99_ms:.3f} | {run.p99_ms / ref.p99_ms:.2f}x |"
        )
    lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    raise SystemExit(main())
