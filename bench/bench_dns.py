"""DNS proxy vs dnsmasq and vs pilot-agent's DNS proxy: QPS and latency for table hits (1,000 and
100,000 names) and for forwarded names.

All three serve one NameTable.  The local mesh holds a ServiceEntry per name (``svcN.bench.mesh``, one
address, only a UDP port, so the names reach the NameTable but no Envoy configuration); pilot-agent gets
the table over NDS from that mesh as it would from istiod; vm-agent's DnsServer (bench/dns/serve.py)
gets the table the mesh serves pilot-agent, and dnsmasq a hosts file written from it.  All three forward
to the same upstream, a dnsmasq on ``UPSTREAM_HOST:53`` (pilot-agent reads resolv.conf, which has no
port); for forwarded names the dnsmasq under test runs with its cache off (``--cache-size=0``), like the
two proxies, which never cache upstream answers.

The servers (and pilot-agent's idle Envoy) are pinned to core 0, dnsperf and the upstream to core 1.
dnsperf alternates between the servers, round by round, so a load change on the shared machine hits all
alike: saturating runs (100 queries outstanding) for QPS, then runs at a fixed rate all sustain, with
per-query latencies (``-v``) for p50/p99 and the server's CPU time per query (from /proc).  Without the
pilot-agent binary (``make interop`` builds it) or without root (its resolv.conf is bind-mounted), that
column is left out and the table says why.

Needs Debian's dnsperf and dnsmasq (``make system-deps``; taskset is util-linux).  Writes bench/results/dns.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.dns.serve import NAMESPACE, SEARCH  # noqa: E402
from bench.pilot_agent import PilotAgent, pilot_agent  # noqa: E402
from tests.helpers.agent import sample_manifests, write_vm_files  # noqa: E402
from tests.helpers.mesh import running_mesh  # noqa: E402
from vm_agent.mesh.nametable import name_table  # noqa: E402
from vm_agent.proto import nds_pb2  # noqa: E402

RESULTS = REPO / "bench" / "results" / "dns.md"
SERVER_CORE = "0"
CLIENT_CORE = "1"
DURATION = float(os.environ.get("BENCH_DNS_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_DNS_ROUNDS", "5"))
FIXED_RATE = int(os.environ.get("BENCH_DNS_RATE", "10000"))
LATENCY_ROUNDS = 3
UPSTREAM_HOST = "127.0.54.1"
FORWARDED_NAMES = 1000
SOURCE = "bench-dns"
PEER_IP = "127.0.9.5"
# (label, names in the table, forwarded?) in the order they run: the big table first, so shrinking it
# to 1,000 names is one update instead of 99,000 more objects in a running mesh.
BIG = int(os.environ.get("BENCH_DNS_NAMES", "100000"))
CASES = ((f"table hit, {BIG:,} names", BIG, False), ("table hit, 1,000 names", 1000, False))
FORWARD_CASE = ("forwarded to a loopback upstream", 1000, True)


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host``."""
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
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def service_entries(names: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": f"bench-{i}", "namespace": NAMESPACE},
            "spec": {
                "hosts": [f"svc{i}.bench.mesh"],
                "addresses": [mesh_ip(i)],
                "location": "MESH_EXTERNAL",
                "resolution": "STATIC",
                # UDP only: Envoy does not proxy it, so the name costs nothing but its NameTable entry.
                "ports": [{"number": 5353, "name": "udp-bench", "protocol": "UDP"}],
            },
        }
        for i in range(names)
    ]


def ask(host: str, port: int, name: str) -> bytes | None:
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(query, (host, port))
            reply = s.recv(4096)
        except OSError:
            return None
    return reply if reply[:2] == b"\x12\x34" else None


def has_records(reply: bytes | None) -> bool:
    return reply is not None and reply[6:8] != b"\x00\x00"


async def wait_until(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


async def wait_table(port: int, names: int, timeout: float = 120.0) -> None:
    """Until the server on 127.0.0.1:port answers the table's last name and not the one after it
    (a forwarded NXDOMAIN before the table is loaded is no proof of anything)."""

    def loaded() -> bool:
        last = ask("127.0.0.1", port, f"svc{names - 1}.bench.mesh")
        beyond = ask("127.0.0.1", port, f"svc{names}.bench.mesh")
        return has_records(last) and beyond is not None and not has_records(beyond)

    await wait_until(f"server on port {port} did not serve the {names:,}-name table", loaded, timeout)


def percentile(values: list[float], q: float) -> float:
    times = sorted(values)
    return times[min(len(times) - 1, int(len(times) * q))] if times else float("nan")


@dataclass
class Run:
    qps: list[float] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)
    p50_s: list[float] = field(default_factory=list)  # one per fixed-rate run
    p99_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    answered: int = 0

    # Medians over the fixed-rate runs: on a shared machine one run's scheduling hiccup would
    # otherwise decide a pooled p99.
    @property
    def p50_ms(self) -> float:
        return statistics.median(self.p50_s) * 1e3 if self.p50_s else float("nan")

    @property
    def p99_ms(self) -> float:
        return statistics.median(self.p99_s) * 1e3 if self.p99_s else float("nan")

    @property
    def cpu_us_per_query(self) -> float:
        return self.cpu_s / self.answered * 1e6 if self.answered else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, queries: Path, rate: int | None) -> tuple[float, float, int, list[float]]:
    cmd = ["taskset", "-c", CLIENT_CORE, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries)]
    cmd += ["-l", str(DURATION), "-q", "100", "-t", "2"]
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lost = float(re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    latencies = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("> ")]
    return qps, lost, done, latencies


def measure(servers: dict[str, tuple[int, int]], queries: Path) -> dict[str, Run]:
    """``servers``: name → (port, pid).  Alternates the servers run by run."""
    runs = {name: Run() for name in servers}
    for _ in range(ROUNDS):
        for name, (port, _) in servers.items():
            qps, lost, _, _ = dnsperf(port, queries, None)
            runs[name].qps.append(qps)
            runs[name].lost.append(lost)
    for _ in range(LATENCY_ROUNDS):
        for name, (port, pid) in servers.items():
            before = cpu_seconds(pid)
            _, _, done, latencies = dnsperf(port, queries, FIXED_RATE)
            runs[name].cpu_s += cpu_seconds(pid) - before
            runs[name].answered += done
            runs[name].p50_s.append(percentile(latencies, 0.5))
            runs[name].p99_s.append(percentile(latencies, 0.99))
    return runs


def start(cmd: list[str], core: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", core, *cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dnsmasq(port: int, host: str, hosts: Path | None, upstream: str | None, cache: bool) -> list[str]:
    cmd = ["dnsmasq", "--keep-in-foreground", f"--port={port}", f"--listen-address={host}", "--bind-interfaces"]
    cmd += ["--no-resolv", "--no-hosts", "--user=root", "--pid-file=", "--log-facility=/dev/null"]
    cmd += ["--dns-forward-max=1000"]
    if hosts is not None:
        cmd.append(f"--addn-hosts={hosts}")
    if upstream is not None:
        cmd.append(f"--server={upstream}")
    if not cache:
        cmd.append("--cache-size=0")
    return cmd


def serve_cmd(port: int, table: Path) -> list[str]:
    return [sys.executable, "-m", "bench.dns.serve", str(port), str(table), UPSTREAM_HOST, "53"]


def served_table(mesh: Any) -> nds_pb2.NameTable:
    """The NameTable the mesh serves pilot-agent (built the same way for a proxy of its namespace when
    pilot-agent is not running)."""
    from vm_agent.mesh.xdsgen import ProxyView

    snapshot = mesh.store.snapshot()
    for conn in list(mesh.ads.connections.values()):
        if conn.node is not None:
            table: nds_pb2.NameTable = name_table(snapshot, mesh.proxy_view(conn), vips=mesh.vips)
            return table
    view = ProxyView(node_id="bench", ips=(PEER_IP,), namespace=NAMESPACE, service_account=None, dns_capture=True)
    table = name_table(snapshot, view, vips=mesh.vips)
    return table


def start_peer(stack: contextlib.ExitStack, mesh: Any, files: Path) -> tuple[PilotAgent | None, int, str]:
    """pilot-agent with its DNS proxy on a free port and our upstream in its resolv.conf; None and the
    reason when it cannot run here."""
    if os.geteuid() != 0:
        return None, 0, "needs root (its resolv.conf is bind-mounted)"
    port = free_port("127.0.0.1")
    resolv = f"nameserver {UPSTREAM_HOST}\nsearch {' '.join(SEARCH)}\n"
    try:
        agent = stack.enter_context(
            pilot_agent(
                mesh,
                files,
                instance_ip=PEER_IP,
                dns_address=("127.0.0.1", port),
                resolv_conf=resolv,
                cpus=SERVER_CORE,
            )
        )
    except FileNotFoundError as err:
        return None, 0, str(err)
    return agent, port, ""


@dataclass
class Row:
    label: str
    server: str
    run: Run


async def run_cases(work: Path) -> tuple[list[Row], str]:
    rows: list[Row] = []
    fq = work / "forward.txt"
    fq.write_text("".join(f"fwd{i}.bench.test A\n" for i in range(FORWARDED_NAMES)))
    async with running_mesh(work / "mesh") as mesh:
        mesh.apply_yaml(sample_manifests(app_port=free_port("127.0.0.1"), service_port=free_port("127.0.0.1")))
        # Blocks the mesh's loop for a while (~1 ms per object); nothing is connected yet.
        mesh.store.apply(service_entries(max(n for _, n, _ in CASES)), source=SOURCE)
        files = write_vm_files(mesh, namespace=NAMESPACE, group="vmapp", out=work / "files", internal_ip=PEER_IP)
        with contextlib.ExitStack() as stack:
            peer, peer_port, why_not = start_peer(stack, mesh, files)
            names_now = max(n for _, n, _ in CASES)
            for label, names, forwarded in (*CASES, FORWARD_CASE):
                if names != names_now:
                    mesh.store.replace_source(SOURCE, service_entries(names), lambda _doc: SOURCE)
                    names_now = names
                servers: dict[str, tuple[int, int]] = {}
                if peer is not None:
                    try:
                        await wait_table(peer_port, names, timeout=600)
                    except TimeoutError:
                        print(peer.log_tail(), file=sys.stderr)
                        raise
                    servers["pilot-agent"] = (peer_port, peer.pid)
                table = served_table(mesh)
                # The bench names, plus the sample Services of the VM's namespace.
                assert sum(h.endswith(".bench.mesh") for h in table.table) == names, (label, len(table.table))
                table_file = work / f"table{names}.pb"
                table_file.write_bytes(table.SerializeToString())
                hosts = work / f"mesh{names}.hosts"
                hosts.write_text("".join(f"{ip} {host}\n" for host, info in table.table.items() for ip in info.ips))
                if forwarded:
                    queries = fq
                else:
                    queries = work / f"hits{names}.txt"
                    queries.write_text("".join(f"svc{i}.bench.mesh A\n" for i in range(names)))
                ports = {"dnsmasq": free_port("127.0.0.1"), "vm-agent": free_port("127.0.0.1")}
                upstream = f"{UPSTREAM_HOST}#53"
                procs = {
                    "dnsmasq": start(
                        dnsmasq(ports["dnsmasq"], "127.0.0.1", hosts, upstream, cache=not forwarded), SERVER_CORE
                    ),
                    "vm-agent": start(serve_cmd(ports["vm-agent"], table_file), SERVER_CORE),
                }
                try:
                    for name in ("dnsmasq", "vm-agent"):
                        await wait_table(ports[name], names)
                        servers[name] = (ports[name], procs[name].pid)
                    names_in_order: tuple[str, ...] = ("dnsmasq", "vm-agent", "pilot-agent")
                    order = {k: servers[k] for k in names_in_order if k in servers}
                    runs = await asyncio.to_thread(measure, order, queries)
                finally:
                    for proc in procs.values():
                        stop(proc)
                for server, run in runs.items():
                    print(
                        f"{label:34} {server:11} {statistics.median(run.qps):8.0f} qps "
                        f"p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms cpu {run.cpu_us_per_query:.1f} us/query",
                        flush=True,
                    )
                    rows.append(Row(label, server, run))
    return rows, why_not


def main() -> int:
    missing = [tool for tool in ("dnsperf", "dnsmasq", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"bench_dns: missing {', '.join(missing)} (make system-deps)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        work = Path(tmp)
        up_hosts = work / "upstream.hosts"
        up_hosts.write_text("".join(f"192.0.2.{i % 250 + 1} fwd{i}.bench.test\n" for i in range(FORWARDED_NAMES)))
        upstream = start(dnsmasq(53, UPSTREAM_HOST, up_hosts, None, True), CLIENT_CORE)
        try:
            asyncio.run(
                wait_until("upstream dnsmasq", lambda: has_records(ask(UPSTREAM_HOST, 53, "fwd1.bench.test")), 30)
            )
            rows, why_not = asyncio.run(run_cases(work))
        finally:
            stop(upstream)
    write_results(rows, why_not)
    return 0


def _ratio(a: list[float], b: list[float]) -> str:
    """Median-QPS ratio, and the range of the per-round ratios (the rounds alternate servers)."""
    rounds = [x / y for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(a) / statistics.median(b):.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"


def write_results(rows: list[Row], why_not: str) -> None:
    order = {label: i for i, label in enumerate((CASES[1][0], CASES[0][0], FORWARD_CASE[0]))}
    rows = sorted(rows, key=lambda r: order.get(r.label, 9))
    by = {(r.label, r.server): r.run for r in rows}
    lines = [
        "# DNS proxy vs dnsmasq and pilot-agent",
        "",
        f"Generated by `python -m bench bench_dns` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (the machine is shared, "
        "runs vary 10-25 %: read the ratios, same run).",
        f"Servers pinned to core {SERVER_CORE}, dnsperf and the upstream dnsmasq to core {CLIENT_CORE}. "
        f"QPS: median of {ROUNDS} dnsperf runs per server, alternating servers round by round, saturating "
        f"(100 queries outstanding), {DURATION:g} s each; ratios are of the medians, with the range of the "
        "per-round ratios in brackets. "
        f"Latency and CPU: {LATENCY_ROUNDS} more runs per server, alternating, at a fixed {FIXED_RATE:,} QPS; "
        "p50/p99 of the per-query times from `-v` of each run, median over the runs; CPU: the server's "
        "user+system time from /proc divided by the queries answered.",
        "One NameTable for all three: the local mesh's, pushed to pilot-agent over NDS, handed to vm-agent's "
        "DnsServer as is and written as a hosts file for dnsmasq. One upstream for all three (a dnsmasq on "
        f"{UPSTREAM_HOST}:53); for forwarded names the dnsmasq under test has its cache off "
        "(`--cache-size=0`), like both proxies, which never cache upstream answers.",
        "",
        "| case | server | QPS | QPS vs dnsmasq | QPS vs pilot-agent | lost % | p50 ms | p99 ms | p99 vs dnsmasq "
        "| CPU µs/query |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = by[(r.label, "dnsmasq")]
        peer = by.get((r.label, "pilot-agent"))
        vs_peer = _ratio(r.run.qps, peer.qps) if peer is not None else "—"
        lines.append(
            f"| {r.label} | {r.server} | {statistics.median(r.run.qps):,.0f} | {_ratio(r.run.qps, ref.qps)} | "
            f"{vs_peer} | {max(r.run.lost):.2f} | {r.run.p50_ms:.3f} | {r.run.p99_ms:.3f} | "
            f"{r.run.p99_ms / ref.p99_ms:.2f}x | {r.run.cpu_us_per_query:.1f} |"
        )
    lines += ["", f"pilot-agent: {'measured' if not why_not else 'not measured: ' + why_not}", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    raise SystemExit(main())
