"""What Istio's peer metadata exchange and standard metrics cost on stock Envoy (bench/results/telemetry.md).

Two VM sidecars configured like the agent configures them (the local mesh's resources, which carry a default
istiod's telemetry filters, through the agent's rewrite for stock Envoy) carry HTTP/1.1 over mTLS from client
VM A's loopback listener to VM B's inbound listener and on to a backend that answers at once (an Envoy
``direct_response``, so the backend is never the bottleneck). Three such pairs run side by side: **native** (what
the agent gives the shipped Envoy), **stock** (the stock-filter path, for any other Envoy) and the peer, **off**
(Istio's filters only dropped: no exchange, no metrics, what vm-agent did before). wrk loads one pair at a time for
a few seconds, in rotating order, round after round, so compared samples are seconds apart. Envoys (concurrency 1
each) share core 0, wrk runs on core 1; throughput and p99 come from wrk.

    flock /tmp/vm-agent-bench.lock .venv/bin/python -m bench bench_telemetry
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.integration.mesh_xdsgen.support import MeshCa, bootstrap, free_port, running_envoy, sds_server
from vm_agent.mesh.model import MeshSnapshot, key, parse_documents
from vm_agent.mesh.xdsgen import ProxyView, generate
from vm_agent.telemetry.native import EXPORT_FILE, NativeStats
from vm_agent.telemetry.native.build import build as native_build
from vm_agent.telemetry.peer import Workload

RESULTS = Path(__file__).parent / "results" / "telemetry.md"
TD = "cluster.local"
MESH = """
apiVersion: v1
kind: Service
metadata: {{name: svc-b, namespace: vm-ns}}
spec: {{clusterIP: 10.96.1.2, selector: {{app: b}}, ports: [{{name: http, port: {sb}, targetPort: {pb}}}]}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: a-127.0.0.2, namespace: vm-ns, annotations: {{istio.io/autoRegistrationGroup: a}}}}
spec: {{address: 127.0.0.2, labels: {{app: a}}, serviceAccount: sa-a}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: b-127.0.0.3, namespace: vm-ns, annotations: {{istio.io/autoRegistrationGroup: b}}}}
spec: {{address: 127.0.0.3, labels: {{app: b, version: v1}}, serviceAccount: sa-b, ports: {{http: {pb}}}}}
"""


def _backend(port: int, admin: int) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "backend",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network"
                                        ".http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "backend",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "b",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "hello from b\n"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http"
                                                    ".router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def vm_workload(ip: str, sa: str) -> Workload:
    """What a VM registered from a WorkloadGroup tells its peers (as many facts as the network lab's VMs send:
    the exchange header's size is part of the cost)."""
    name = sa[-1]
    return Workload(
        instance=f"{name}-{ip}",
        namespace="vm-ns",
        workload=name,
        cluster="Kubernetes",
        identity=f"spiffe://{TD}/ns/vm-ns/sa/{sa}",
        canonical_name=name,
        canonical_revision="v1",
        app=name,
        version="v1",
    )


@contextlib.contextmanager
def _sidecar(
    work: Path,
    snap: MeshSnapshot,
    ca: MeshCa,
    ip: str,
    sa: str,
    telemetry: bool,
    prefix: Sequence[str] = (),
    native: str | None = None,
) -> Iterator[int]:
    work.mkdir(parents=True, exist_ok=True)
    proxy = ProxyView(
        node_id=f"sidecar~{ip}~{sa[-1]}.vm-ns~vm-ns.svc.cluster.local",
        ips=(ip,),
        namespace="vm-ns",
        service_account=sa,
        interception_mode="NONE",
        metadata={"WORKLOAD_ENTRY": f"{sa[-1]}-{ip}"},
    )
    res = generate(snap, proxy, trust_domain=TD, vips={})
    sock = work / "sds.sock"
    with sds_server(sock, ca.issue(f"spiffe://{TD}/ns/vm-ns/sa/{sa}"), ca.root_pem):
        boot = bootstrap(
            res,
            node_id=proxy.node_id,
            sds_socket=sock,
            admin_port=free_port(),
            inline=True,
            telemetry=telemetry,
            workload=vm_workload(ip, sa),
            native=None if native is None else NativeStats(native, str(work / EXPORT_FILE)),
        )
        with running_envoy(boot, work, prefix=prefix, ready_within=300 if prefix else 30) as admin:
            yield admin


def _wrk(url: str, seconds: float, connections: int) -> tuple[float, float]:
    """(requests/s, p99 ms) from wrk pinned to core 1."""
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    assert m is not None, out
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw errors: {out}")
    return rps, p99


def _istio_series(admin: int, work: Path) -> int:
    """Raw request series in the sidecar's Envoy stats or in the native filter's file (``work``: its folder)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    time.sleep(1.5)  # the native filter writes its file once a second
    export = work / EXPORT_FILE
    text += export.read_text() if export.exists() else ""
    # istio_requests_total is the duration histogram's count (the agent renders it): the histogram is the proof.
    prefix = "envoy_istiocustom_istio_request_duration_milliseconds_count"
    return sum(1 for line in text.splitlines() if line.startswith(prefix))


MODES = ("off", "native", "stock")
"""off: Istio's filters only dropped; native: what the agent gives the shipped Envoy (the native stats filter);
stock: the stock-filter path (any other Envoy, or no C compiler where the agent was built)."""


def run(rounds: int, seconds: float, connections: int) -> dict[str, Any]:
    """All three pairs of sidecars run side by side (each with its own ports and backend); every round loads each
    pair in turn for ``seconds``, the order rotating, so the samples compared are seconds apart, not minutes: the
    shared machine's swings hit a round's three samples alike and cancel in the per-round ratios."""
    os.sched_setaffinity(0, {0})  # the Envoys inherit core 0; wrk runs on core 1
    module = native_build()
    if module is None:
        raise RuntimeError("the native stats filter could not be built (no C compiler)")
    ca = MeshCa()
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    urls: dict[str, str] = {}
    checks: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix="vmtel", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            admins: dict[str, int] = {}
            b_work: dict[str, Path] = {}
            for mode in MODES:
                pb, sb = free_port(), free_port()
                snap = MeshSnapshot(1, {key(o): o for o in parse_documents(MESH.format(pb=pb, sb=sb), "mesh.yaml")})
                work = tmp / mode
                (work / "backend").mkdir(parents=True)
                stack.enter_context(running_envoy(_backend(pb, free_port()), work / "backend"))
                native = str(module) if mode == "native" else None
                on = mode != "off"
                stack.enter_context(_sidecar(work / "a", snap, ca, "127.0.0.2", "sa-a", on, native=native))
                admins[mode] = stack.enter_context(
                    _sidecar(work / "b", snap, ca, "127.0.0.3", "sa-b", on, native=native)
                )
                b_work[mode] = work / "b"
                urls[mode] = f"http://127.0.0.1:{sb}/"
                _wrk(urls[mode], 1, connections)  # warm up connections and TLS sessions
            for r in range(rounds):
                order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
                for mode in order:
                    samples[mode].append(_wrk(urls[mode], seconds, connections))
                print(
                    f"  round {r + 1}: "
                    + ", ".join(f"{m} {samples[m][-1][0]:.0f} req/s p99 {samples[m][-1][1]:.2f} ms" for m in MODES),
                    flush=True,
                )
            checks = {mode: _istio_series(admin, b_work[mode]) for mode, admin in admins.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if checks["native"] == 0 or checks["stock"] == 0 or checks["off"] != 0:
        raise RuntimeError(f"telemetry was not (only) on where expected: {checks}")
    return {"samples": samples, "rounds": rounds, "seconds": seconds, "connections": connections}


def _cost(result: dict[str, Any], mode: str) -> tuple[float, list[float]]:
    """1 - the median of the per-round mode/off throughput ratios (paired rounds cancel the machine's drift)."""
    ratios = sorted(a[0] / b[0] for a, b in zip(result["samples"][mode], result["samples"]["off"], strict=True))
    return 1 - statistics.median(ratios), ratios


def report(result: dict[str, Any]) -> str:
    med = {
        m: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
        for m, v in result["samples"].items()
    }
    lines = [
        "# Istio's exchange and metrics on stock Envoy: cost",
        "",
        "`bench/bench_telemetry.py`, run under `flock /tmp/vm-agent-bench.lock`. Client VM A's Envoy → mTLS →",
        "VM B's Envoy → a `direct_response` backend, HTTP/1.1, wrk on core 1 "
        f"(`-t1 -c{result['connections']}`, {result['seconds']:.0f} s per run), the three Envoys (concurrency 1) on"
        " core 0. **native**: what the agent gives the shipped Envoy for a default istiod (header exchange, ALPN"
        " hint, the native stats filter on both sides); **stock**: the same with the stats access logs and"
        " metadata rules of the stock-filter path (any other Envoy binary); **off**: Istio's filters only dropped"
        f" (no exchange, no metrics). The three pairs run side by side; {result['rounds']} rounds load each in turn"
        " (the order rotating), medians.",
        "",
        "| | req/s | p99 (ms) | throughput cost vs off (per-round range) | p99 vs off |",
        "|---|---:|---:|---:|---:|",
        f"| off (peer) | {med['off'][0]:,.0f} | {med['off'][1]:.2f} | | |",
    ]
    for mode in ("native", "stock"):
        cost, ratios = _cost(result, mode)
        lines.append(
            f"| {mode} | {med[mode][0]:,.0f} | {med[mode][1]:.2f} | **{cost * 100:.1f} %** "
            f"({(1 - ratios[-1]) * 100:.1f}-{(1 - ratios[0]) * 100:.1f} %) | {med[mode][1] / med['off'][1]:.2f}x |"
        )
    lines += [
        "",
        "Throughput cost: 1 - the median of the per-round mode/off ratios. Budget ≤ 15 %.",
        "",
        "Per run (req/s, p99 ms): "
        + "; ".join(
            ", ".join(f"{m} {result['samples'][m][i][0]:,.0f}/{result['samples'][m][i][1]:.2f}" for m in MODES)
            for i in range(result["rounds"])
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if a.startswith("--")])
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("wrk and taskset are needed (make system-deps installs them)")
        return 1
    started = time.monotonic()
    result = run(args.rounds, args.seconds, args.connections)
    text = report(result)
    print(text)
    print(f"({time.monotonic() - started:.0f} s)")
    RESULTS.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
