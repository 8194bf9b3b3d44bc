"""A newcomer's first run: the built-in local mesh, the VM files istioctl would write, a sample app with a
readiness probe, and ``vm-agent run`` with real Envoy, real DNS and real probes — all on loopback.

``python -m vm_agent.demo`` keeps everything running until Ctrl-C; ``--once`` stops after the checks
(what the tests run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

NAMESPACE = "demo"
GROUP = "hello"
SERVICE_ACCOUNT = "hello-sa"
INSTANCE_IP = "127.0.0.2"


def _port_free(port: int, host: str = "127.0.0.1", udp: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick(preferred: int, *, udp_too: bool = False, taken: set[int]) -> int:
    """The well-known port when it is free, else any free one (a second demo or a test may be running)."""
    if preferred not in taken and _port_free(preferred) and (not udp_too or _port_free(preferred, udp=True)):
        taken.add(preferred)
        return preferred
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken and (not udp_too or _port_free(port, udp=True)):
            taken.add(port)
            return port


def manifests(app_port: int, service_port: int) -> str:
    return f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {SERVICE_ACCOUNT}, namespace: {NAMESPACE}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: {GROUP}, namespace: {NAMESPACE}}}
spec:
  metadata:
    labels: {{app: {GROUP}, version: v1}}
  template:
    serviceAccount: {SERVICE_ACCOUNT}
    ports: {{http: {app_port}}}
  probe:
    periodSeconds: 2
    httpGet: {{host: 127.0.0.1, port: {app_port}, path: /ready}}
---
apiVersion: v1
kind: Service
metadata: {{name: {GROUP}, namespace: {NAMESPACE}}}
spec:
  selector: {{app: {GROUP}}}
  ports:
  - {{name: http, port: {service_port}, targetPort: {app_port}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payments-api, namespace: {NAMESPACE}}}
spec:
  hosts: [api.payments.example]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 443, name: tls, protocol: TLS}}]
"""


class SampleApp:
    """The VM's workload: answers / with who called it (from Envoy's x-forwarded-client-cert)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def ready(_: web.Request) -> web.Response:
            return web.Response(text="ready")

        async def hello(request: web.Request) -> web.Response:
            xfcc = request.headers.get("x-forwarded-client-cert", "")
            caller = next((p[4:] for p in xfcc.split(";") if p.startswith("URI=")), "(no client certificate)")
            return web.Response(text=f"hello from the VM app; caller identity: {caller}\n")

        app = web.Application()
        app.router.add_get("/ready", ready)
        app.router.add_get("/", hello)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs only
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _say(mark: str, text: str) -> None:
    print(f"  {mark} {text}", flush=True)


async def _until(what: str, check: Callable[[], Any], timeout: float, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early (exit {p.returncode}: {p.args!r})")
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


async def demo(workdir: Path, once: bool) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "manifests").mkdir(parents=True)
    taken: set[int] = set()
    ports = {
        "xds": _pick(15012, taken=taken),
        "mesh_admin": _pick(15014, taken=taken),
        "status": _pick(15020, taken=taken),
        "envoy_admin": _pick(15000, taken=taken),
        "envoy_ready": _pick(15021, taken=taken),
        "envoy_prom": _pick(15090, taken=taken),
        "dns": _pick(15053, udp_too=True, taken=taken),
        "app": _pick(8080, taken=taken),
        "service": _pick(9080, taken=taken),
    }
    cli = [sys.executable, "-m", "vm_agent"]
    procs: list[subprocess.Popen[bytes]] = []
    app = SampleApp(ports["app"])
    print("vm-agent demo: a VM joining a mesh, all on loopback\n", flush=True)
    try:
        (workdir / "manifests" / "demo.yaml").write_text(manifests(ports["app"], ports["service"]))
        print(f"1. the built-in local mesh (istiod stand-in) on 127.0.0.1:{ports['xds']}", flush=True)
        mesh_log = (workdir / "mesh.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "mesh",
                    "serve",
                    "--state",
                    str(workdir / "mesh"),
                    "--manifests",
                    str(workdir / "manifests"),
                    "--listen",
                    f"127.0.0.1:{ports['xds']}",
                    "--admin-listen",
                    f"127.0.0.1:{ports['mesh_admin']}",
                ],
                stdout=mesh_log,
                stderr=subprocess.STDOUT,
            )
        )
        admin = f"http://127.0.0.1:{ports['mesh_admin']}"
        await _until("the local mesh", lambda: _get(admin + "/healthz")[0] == 200, 60, procs)
        _say("✓", f"mesh up; manifests in {workdir / 'manifests'} (WorkloadGroup {NAMESPACE}/{GROUP}, a Service)")

        print("2. the five files `istioctl x workload entry configure` writes", flush=True)
        out = workdir / "vm-files"
        rc = subprocess.call(
            [
                *cli,
                "mesh",
                "vm-files",
                "--state",
                str(workdir / "mesh"),
                "--admin-url",
                admin,
                "--group",
                GROUP,
                "--namespace",
                NAMESPACE,
                "--out",
                str(out),
                "--ingress-ip",
                "127.0.0.1",
                "--internal-ip",
                INSTANCE_IP,
                "--autoregister",
            ]
        )
        if rc != 0:
            raise RuntimeError("vm-files failed")
        _say("✓", f"{out}: {', '.join(sorted(p.name for p in out.iterdir()))}")

        print(f"3. the VM's app on 127.0.0.1:{ports['app']} with a /ready probe", flush=True)
        await app.start()
        _say("✓", "app listening")

        print("4. vm-agent run (real Envoy, DNS proxy, readiness probe)", flush=True)
        proxy_config = (
            f"proxyAdminPort: {ports['envoy_admin']}\nstatusPort: {ports['status']}\n"
            f"configPath: {workdir / 'proxy'}\ninterceptionMode: NONE\nterminationDrainDuration: 2s\n"
        )
        settings = {
            "ISTIO_SVC_IP": INSTANCE_IP,
            "VM_AGENT_SCAN_INTERFACES": "false",
            "DNS_PROXY_ADDR": f"127.0.0.1:{ports['dns']}",
            "ENVOY_STATUS_PORT": str(ports["envoy_ready"]),
            "ENVOY_PROMETHEUS_PORT": str(ports["envoy_prom"]),
            "PROXY_CONFIG": proxy_config,
            "VM_AGENT_SDS_SOCKET": str(workdir / "sds.sock"),
            "POD_NAME": "demo-vm",
        }
        agent_cmd = [
            *cli,
            "run",
            "--config-dir",
            str(out),
            "--state-dir",
            str(workdir / "state"),
            "--resolv-conf",
            "/etc/resolv.conf",
        ]
        for key, value in settings.items():
            agent_cmd += ["--set", f"{key}={value}"]
        agent_log = (workdir / "agent.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG", "VM_AGENT_"))}
        agent = subprocess.Popen(agent_cmd, stdout=agent_log, stderr=subprocess.STDOUT, env=env)
        procs.append(agent)
        status_url = f"http://127.0.0.1:{ports['status']}"

        def identity() -> dict[str, Any] | None:
            code, body = _get(status_url + "/debug/status")
            if code != 200:
                return None
            ident = json.loads(body).get("identity") or {}
            return ident if ident.get("spiffe_id") else None

        ident = await _until("a workload certificate", identity, 60, procs)
        _say("✓", f"identity {ident['spiffe_id']} (valid until {ident.get('not_after')})")

        def envoy() -> dict[str, Any] | None:
            code, body = _get(f"http://127.0.0.1:{ports['envoy_admin']}/ready")
            if code != 200 or body.strip() != b"LIVE":
                return None
            if _get(status_url + "/healthz/ready")[0] != 200:
                return None
            _, dump = _get(f"http://127.0.0.1:{ports['envoy_admin']}/config_dump", timeout=5)
            text = dump.decode(errors="replace")
            return {"listeners": text.count('"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"')}

        live = await _until("Envoy live with the mesh's configuration", envoy, 90, procs)
        _say("✓", f"Envoy live, {live['listeners']} listeners from the mesh; /healthz/ready is 200")

        from dnslib import DNSRecord

        name = f"{GROUP}.{NAMESPACE}.svc.cluster.local"

        def dns() -> list[str] | None:
            try:
                reply = DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", ports["dns"], timeout=2))
            except OSError:
                return None
            return [str(rr.rdata) for rr in reply.rr] or None

        answers = await _until("DNS answering a mesh name", dns, 60, procs)
        _say("✓", f"DNS 127.0.0.1:{ports['dns']}: {name} → {', '.join(answers)}")

        entry = f"{GROUP}-{INSTANCE_IP}"

        def healthy() -> str | None:
            code, body = _get(admin + "/v1/workloadentries")
            if code != 200:
                return None
            items = json.loads(body)
            items = items.get("items", items) if isinstance(items, dict) else items
            for item in items:
                if item.get("metadata", {}).get("name") == entry:
                    for cond in (item.get("status") or {}).get("conditions") or []:
                        if cond.get("type") == "Healthy" and cond.get("status") == "True":
                            return "True"
            return None

        await _until("health reported to the mesh", healthy, 60, procs)
        _say("✓", f"WorkloadEntry {NAMESPACE}/{entry} auto-registered, condition Healthy=True")

        def call() -> str | None:
            code, body = _get(f"http://127.0.0.1:{ports['service']}/")
            return body.decode().strip() if code == 200 else None

        reply = await _until("a call through Envoy over mTLS", call, 60, procs)
        _say("✓", f"GET http://127.0.0.1:{ports['service']}/ (Envoy → mTLS → app): {reply}")

        print(
            "\nvm-agent is running. Try:\n"
            f"  vm-agent status --url {status_url}\n"
            f"  dig @127.0.0.1 -p {ports['dns']} {name}\n"
            f"  curl http://127.0.0.1:{ports['service']}/\n"
            f"  vm-agent mesh get workloadentries --admin-url {admin}\n"
            f"logs: {workdir / 'agent.log'}, {workdir / 'mesh.log'}",
            flush=True,
        )
        if not once:
            print("Ctrl-C stops the agent (it reports not-ready, drains Envoy, then exits).", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        agent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.wait, 30)
        _say("✓" if code == 0 else "✗", f"agent stopped (exit {code})")
        return 0 if code == 0 else 1
    except RuntimeError as err:
        print(f"\ndemo failed: {err}\nsee {workdir / 'agent.log'} and {workdir / 'mesh.log'}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=20)
            if p.poll() is None:
                p.kill()
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="stop after the checks instead of running until Ctrl-C")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vm-agent-demo"))
    ns = parser.parse_args(argv)
    return asyncio.run(demo(ns.workdir, ns.once))


if __name__ == "__main__":
    raise SystemExit(main())
