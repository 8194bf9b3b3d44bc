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
# A second VM that calls hello through its own Envoy, so the call crosses the mesh over mTLS.
CLIENT_GROUP = "client"
CLIENT_SERVICE_ACCOUNT = "client-sa"
CLIENT_IP = "127.0.0.3"


def _port_free(port: int, host: str = "127.0.0.1", udp: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick(preferred: int, *, udp_too: bool = False, taken: set[int]) -> int:
    """The well-known port when it is free, else any free one (a second demo or a test may be running)."""
    if (
        preferred
        and preferred not in taken
        and _port_free(preferred)
        and (not udp_too or _port_free(preferred, udp=True))
    ):
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
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {CLIENT_SERVICE_ACCOUNT}, namespace: {NAMESPACE}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: {CLIENT_GROUP}, namespace: {NAMESPACE}}}
spec:
  metadata:
    labels: {{app: {CLIENT_GROUP}}}
  template:
    serviceAccount: {CLIENT_SERVICE_ACCOUNT}
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


def try_commands(status_url: str, dns_port: int, name: str, service_url: str, admin: str) -> list[str]:
    """What to try next, each with a command this machine has: dig and curl are often missing on a
    fresh one, while the demo's own interpreter (with dnslib) and vm-agent are always there."""
    python = sys.executable
    beside = Path(python).with_name("vm-agent")
    agent = "vm-agent" if shutil.which("vm-agent") else (str(beside) if beside.is_file() else f"{python} -m vm_agent")
    if shutil.which("dig"):
        query = f"dig @127.0.0.1 -p {dns_port} {name}"
    else:
        query = f"{python} -m dnslib.client --short -s 127.0.0.1:{dns_port} {name}"
    if shutil.which("curl"):
        fetch = f"curl {service_url}"
    else:
        fetch = f"{python} -c \"import urllib.request; print(urllib.request.urlopen('{service_url}').read().decode())\""
    return [
        f"{agent} status --url {status_url}",
        query,
        fetch,
        f"{agent} mesh get workloadentries --admin-url {admin}",
    ]


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


class _Run:
    """What one demo run started, so everything is stopped on the way out."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.taken: set[int] = set()
        self.cli = [sys.executable, "-m", "vm_agent"]

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen([*self.cli, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def vm_files(self, admin: str, group: str, ip: str) -> Path:
        out = self.workdir / f"vm-files-{group}"
        args = ["mesh", "vm-files", "--state", str(self.workdir / "mesh"), "--admin-url", admin, "--group", group]
        args += ["--namespace", NAMESPACE, "--out", str(out), "--ingress-ip", "127.0.0.1", "--internal-ip", ip]
        if subprocess.call([*self.cli, *args, "--autoregister"]) != 0:
            raise RuntimeError(f"vm-files for {group} failed")
        return out

    def agent(self, name: str, files: Path, ip: str, *, well_known: bool) -> dict[str, int]:
        """``vm-agent run`` for one VM; the first one gets the well-known ports when they are free."""
        pick = (lambda p, **kw: _pick(p, taken=self.taken, **kw)) if well_known else None
        ports = {
            "status": pick(15020) if pick else _pick(0, taken=self.taken),
            "envoy_admin": pick(15000) if pick else _pick(0, taken=self.taken),
            "envoy_ready": pick(15021) if pick else _pick(0, taken=self.taken),
            "envoy_prom": pick(15090) if pick else _pick(0, taken=self.taken),
            "dns": pick(15053, udp_too=True) if pick else _pick(0, udp_too=True, taken=self.taken),
        }
        proxy_config = (
            f"proxyAdminPort: {ports['envoy_admin']}\nstatusPort: {ports['status']}\n"
            f"configPath: {self.workdir / name / 'proxy'}\ninterceptionMode: NONE\nterminationDrainDuration: 2s\n"
        )
        settings = {
            "ISTIO_SVC_IP": ip,
            "VM_AGENT_SCAN_INTERFACES": "false",
            "DNS_PROXY_ADDR": f"127.0.0.1:{ports['dns']}",
            "ENVOY_STATUS_PORT": str(ports["envoy_ready"]),
            "ENVOY_PROMETHEUS_PORT": str(ports["envoy_prom"]),
            "PROXY_CONFIG": proxy_config,
            "VM_AGENT_SDS_SOCKET": str(self.workdir / name / "sds.sock"),
            "POD_NAME": f"{name}-vm",
        }
        args = ["run", "--config-dir", str(files), "--state-dir", str(self.workdir / name / "state")]
        args += ["--resolv-conf", "/etc/resolv.conf"]
        for key, value in settings.items():
            args += ["--set", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG", "VM_AGENT_"))}
        (self.workdir / name).mkdir(parents=True, exist_ok=True)
        self.spawn(name, args, env)
        return ports

    async def until(self, what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
        return await _until(what, check, timeout, self.procs)


def _identity(status_url: str) -> dict[str, Any] | None:
    code, body = _get(status_url + "/debug/status")
    if code != 200:
        return None
    ident = json.loads(body).get("identity") or {}
    return ident if ident.get("spiffe_id") else None


def _envoy_ready(ports: dict[str, int]) -> dict[str, Any] | None:
    code, body = _get(f"http://127.0.0.1:{ports['envoy_admin']}/ready")
    if code != 200 or body.strip() != b"LIVE":
        return None
    if _get(f"http://127.0.0.1:{ports['status']}/healthz/ready")[0] != 200:
        return None
    _, dump = _get(f"http://127.0.0.1:{ports['envoy_admin']}/config_dump", timeout=5)
    text = dump.decode(errors="replace")
    return {"listeners": text.count('"@type": "type.googleapis.com/envoy.config.listener.v3.Listener"')}


async def demo(workdir: Path, once: bool) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "manifests").mkdir(parents=True)
    run = _Run(workdir)
    xds_port = _pick(15012, taken=run.taken)
    admin_port = _pick(15014, taken=run.taken)
    app_port = _pick(8080, taken=run.taken)
    service_port = _pick(9080, taken=run.taken)
    app = SampleApp(app_port)
    print("vm-agent demo: two VMs joining a mesh, all on loopback\n", flush=True)
    try:
        (workdir / "manifests" / "demo.yaml").write_text(manifests(app_port, service_port))
        print(f"1. the built-in local mesh (istiod stand-in) on 127.0.0.1:{xds_port}", flush=True)
        mesh_args = ["mesh", "serve", "--state", str(workdir / "mesh"), "--manifests", str(workdir / "manifests")]
        mesh_args += ["--listen", f"127.0.0.1:{xds_port}", "--admin-listen", f"127.0.0.1:{admin_port}"]
        run.spawn("mesh", mesh_args)
        admin = f"http://127.0.0.1:{admin_port}"
        await run.until("the local mesh", lambda: _get(admin + "/healthz")[0] == 200, 60)
        _say("✓", f"mesh up; manifests in {workdir / 'manifests'}: WorkloadGroups {GROUP} and {CLIENT_GROUP}")

        print("2. the five files `istioctl x workload entry configure` writes, for each VM", flush=True)
        hello_files = run.vm_files(admin, GROUP, INSTANCE_IP)
        client_files = run.vm_files(admin, CLIENT_GROUP, CLIENT_IP)
        _say("✓", f"{hello_files}: {', '.join(sorted(p.name for p in hello_files.iterdir()))}")

        print(f"3. the hello VM's app on 127.0.0.1:{app_port} (readiness probe GET /ready)", flush=True)
        await app.start()
        _say("✓", "app listening")

        print(f"4. vm-agent run on the hello VM ({INSTANCE_IP}) and the client VM ({CLIENT_IP})", flush=True)
        hello = run.agent(GROUP, hello_files, INSTANCE_IP, well_known=True)
        client = run.agent(CLIENT_GROUP, client_files, CLIENT_IP, well_known=False)
        status_url = f"http://127.0.0.1:{hello['status']}"
        ident = await run.until("a workload certificate", lambda: _identity(status_url), 60)
        _say("✓", f"identity {ident['spiffe_id']} (valid until {ident.get('not_after')})")
        live = await run.until("Envoy live with the mesh's configuration", lambda: _envoy_ready(hello))
        _say("✓", f"Envoy live, {live['listeners']} listeners from the mesh; /healthz/ready is 200")

        from dnslib import DNSRecord

        name = f"{GROUP}.{NAMESPACE}.svc.cluster.local"

        def dns() -> list[str] | None:
            try:
                reply = DNSRecord.parse(DNSRecord.question(name).send("127.0.0.1", hello["dns"], timeout=2))
            except OSError:
                return None
            return [str(rr.rdata) for rr in reply.rr] or None

        answers = await run.until("DNS answering a mesh name", dns, 60)
        _say("✓", f"DNS 127.0.0.1:{hello['dns']}: {name} → {', '.join(answers)} (from the mesh's NameTable)")

        entry = f"{GROUP}-{INSTANCE_IP}"

        def healthy() -> str | None:
            code, body = _get(admin + "/v1/workloadentries")
            if code != 200:
                return None
            for item in json.loads(body).get("items", []):
                if item.get("metadata", {}).get("name") == entry:
                    for cond in (item.get("status") or {}).get("conditions") or []:
                        if cond.get("type") == "Healthy" and cond.get("status") == "True":
                            return "True"
            return None

        await run.until("health reported to the mesh", healthy, 60)
        _say("✓", f"WorkloadEntry {NAMESPACE}/{entry} auto-registered, condition Healthy=True (probe passing)")

        await run.until("the client VM's Envoy", lambda: _envoy_ready(client))

        def call() -> str | None:
            code, body = _get(f"http://127.0.0.1:{service_port}/")
            return body.decode().strip() if code == 200 else None

        reply = await run.until("a call through the client VM's Envoy over mTLS", call, 60)
        _say("✓", f"client VM: GET http://127.0.0.1:{service_port}/ → Envoy → mTLS → hello VM → app:")
        _say(" ", reply)

        def istio_metric() -> str | None:
            # Istio's standard metrics on the merged endpoint; the pods' dashboards and Kiali read these.
            code, body = _get(status_url + "/stats/prometheus")
            for line in body.decode(errors="replace").splitlines() if code == 200 else []:
                if line.startswith('istio_requests_total{reporter="destination"'):
                    return line
            return None

        metric = await run.until("Istio's request metric on the hello VM", istio_metric, 30)
        _say("✓", f"hello VM: {status_url}/stats/prometheus has Istio's metrics:")
        _say(" ", metric)

        print("\nvm-agent is running. Try:", flush=True)
        for hint in try_commands(status_url, hello["dns"], name, f"http://127.0.0.1:{service_port}/", admin):
            print(f"  {hint}", flush=True)
        print(f"  (Istio's metrics: {status_url}/stats/prometheus, lines starting istio_)", flush=True)
        print(f"logs: {workdir}/{{hello,client,mesh}}.log", flush=True)
        if not once:
            print("Ctrl-C stops the agents (each reports not-ready, drains Envoy, then exits).", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        agents = run.procs[1:]
        for proc in agents:
            proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(proc.wait, 30) for proc in agents]
        _say("✓" if not any(codes) else "✗", f"agents stopped (exit {', '.join(map(str, codes))})")
        return 0 if not any(codes) else 1
    except RuntimeError as err:
        print(f"\ndemo failed: {err}\nsee the logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(run.procs):
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
