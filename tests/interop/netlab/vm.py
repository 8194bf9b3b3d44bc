"""One lab VM: istioctl's files, `vm-agent netfilter apply`, then `vm-agent run` as the proxy user, and the app
as another user - the VM guide's steps, through the agent's real CLI, inside the VM's own namespace."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.interop.netlab.netns import Host

HERE = Path(__file__).resolve().parent
GUARD = HERE / "guard.py"
VMAPP = HERE / "vmapp.py"
PROXY_UID = 1337
"""Istio's proxy user id (istio-proxy); the capture rules let this uid's traffic out unredirected."""
APP_UID = 1500
HTTP_PORT = 8080
TCP_PORT = 9000


def lab_python(work: Path) -> Path:
    """An interpreter the proxy and app users can run: Debian's python3.11 in a venv that sees this checkout's
    packages (the test's own interpreter usually lives under /root, which other users cannot enter)."""
    system = Path("/usr/bin/python3.11")
    if not system.exists():
        raise FileNotFoundError(
            "the network lab runs the agent as the proxy user with /usr/bin/python3.11 (apt-get install python3.11)"
        )
    venv = work / "labpy"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (venv / "lib" / "python3.11" / "site-packages" / "vmlab.pth").write_text(
        f"import site; site.addsitedir({str(site)!r})\n"
    )
    subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    return venv / "bin" / "python"


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, gid)


class Vm:
    """A VM of the lab. ``files`` is istioctl's output folder for its WorkloadGroup."""

    def __init__(
        self,
        host: Host,
        *,
        work: Path,
        files: Path,
        python: Path,
        version: str = "",
        extra_env: dict[str, str] | None = None,
        app_name: str | None = None,
        gateway: bool = False,
    ) -> None:
        self.host = host
        self.gateway = gateway
        self.name = host.role
        self.version = version
        self.app_name = app_name or host.role
        self.python = python
        self.work = work / host.role
        self.work.mkdir(parents=True)
        self.work.chmod(0o755)
        self.config_dir = self.work / "config"
        shutil.copytree(files, self.config_dir)
        self.state_dir = self.work / "state"
        self.proxy_dir = self.work / "proxy"
        self.run_dir = self.work / "run"
        self.home = self.work / "home"
        for d in (self.state_dir, self.proxy_dir, self.run_dir, self.home):
            d.mkdir()
        chown_tree(self.config_dir, PROXY_UID, PROXY_UID)
        for d in (self.state_dir, self.proxy_dir, self.run_dir, self.home):
            os.chown(d, PROXY_UID, PROXY_UID)
        (self.config_dir / "istio-token").chmod(0o600)
        self.state_dir.chmod(0o700)
        self.app_dir = self.work / "app"
        self.app_dir.mkdir()
        os.chown(self.app_dir, APP_UID, APP_UID)
        self.control = self.app_dir / "control.sock"
        self.agent_log = self.work / "agent.log"
        self.app_log = self.work / "app.log"
        self.env = {
            "VM_AGENT_SDS_SOCKET": str(self.run_dir / "sds.sock"),
            "PROXY_CONFIG": json.dumps({"configPath": str(self.proxy_dir)}),
        }
        if version:
            labels = json.loads(self.cluster_env().get("ISTIO_METAJSON_LABELS", "{}") or "{}")
            labels["version"] = version
            # The operator's per-VM addition (a systemd drop-in would carry it): the environment overrides cluster.env.
            self.env["ISTIO_METAJSON_LABELS"] = json.dumps(labels, separators=(",", ":"))
        self.env.update(extra_env or {})
        self.agent: subprocess.Popen[bytes] | None = None
        self.app_proc: subprocess.Popen[bytes] | None = None
        self.agent_starts = 0

    # ------------------------------------------------------------------ files

    def cluster_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in (self.config_dir / "cluster.env").read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                out[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
        return out

    def set_args(self) -> list[str]:
        return [f"--set={k}={v}" for k, v in self.env.items()]

    # ------------------------------------------------------------------ the VM guide's steps

    def netfilter(self, action: str) -> subprocess.CompletedProcess[str]:
        """`vm-agent netfilter apply|cleanup|show` as root, as the systemd unit's ExecStartPre/ExecStopPost run it."""
        argv = [
            sys.executable,
            "-m",
            "vm_agent",
            "netfilter",
            action,
            f"--config-dir={self.config_dir}",
            *(["--gateway"] if self.gateway else []),
            *self.set_args(),
        ]
        return self.host.run(*argv, check=False)

    def _guarded(self, uid: int, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        guard = [sys.executable, str(GUARD), f"--uid={uid}", f"--gid={uid}", f"--cwd={self.work}"]
        guard += [f"--env={k}={v}" for k, v in env.items()]
        full = [*self.host.exec_prefix(), "setpriv", "--pdeathsig", "KILL", "--", *guard, "--", *argv]
        with log.open("ab") as fh:
            return subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def start_agent(self) -> None:
        self.agent_starts += 1
        with self.agent_log.open("ab") as fh:
            fh.write(f"----- start {self.agent_starts} at {time.time():.3f}\n".encode())
        argv = [
            str(self.python),
            "-m",
            "vm_agent",
            "run",
            f"--config-dir={self.config_dir}",
            f"--state-dir={self.state_dir}",
            *(["--gateway"] if self.gateway else []),
            *self.set_args(),
        ]
        self.agent = self._guarded(PROXY_UID, argv, self.agent_log, {"HOME": str(self.home)})

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(timeout)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(5)
        return self.agent.returncode

    def agent_alive(self) -> bool:
        return self.agent is not None and self.agent.poll() is None

    def must_be_alive(self) -> None:
        if not self.agent_alive():
            raise AssertionError(
                f"{self.name}: vm-agent run exited ({self.agent and self.agent.returncode}):\n{self.agent_tail()}"
            )

    def agent_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start_app(self) -> None:
        argv = ["/usr/bin/python3", str(VMAPP), f"--name={self.app_name}", f"--version={self.version}"]
        argv += [f"--control={self.control}", f"--http-port={HTTP_PORT}", f"--tcp-port={TCP_PORT}"]
        self.app_proc = self._guarded(APP_UID, argv, self.app_log, {"HOME": str(self.app_dir)})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.app("ping")
                return
            except OSError:
                if self.app_proc.poll() is not None:
                    raise AssertionError(
                        f"{self.name}: app exited: {self.app_log.read_text(errors='replace')}"
                    ) from None
                time.sleep(0.1)
        raise AssertionError(f"{self.name}: app control socket never answered")

    # ------------------------------------------------------------------ talking to the VM

    def app(self, op: str, wait: float = 180, **args: Any) -> Any:
        """One command to the app's control socket (it runs inside the VM's namespace as the app's user);
        ``wait`` bounds how long the test waits for the answer, ``args`` go to the command."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(wait)
            s.connect(str(self.control))
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if "error" in reply:
            raise AssertionError(f"{self.name}: app command {op} failed: {reply['error']}")
        return reply["ok"]

    def local_get(self, port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET on the VM's own loopback (admin 15000, status 15020) from a thread inside its namespace."""

        def fetch() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
                    return int(resp.status), resp.read()
            except urllib.error.HTTPError as exc:
                return int(exc.code), exc.read()
            except (urllib.error.URLError, OSError):
                return 0, b""

        return self.host.call(fetch)

    def status(self) -> dict[str, Any] | None:
        code, body = self.local_get(15020, "/debug/status")
        return json.loads(body) if code == 200 else None

    def ready(self) -> bool:
        return self.local_get(15021, "/healthz/ready")[0] == 200

    def envoy_pid(self) -> int | None:
        """Envoy's pid among this namespace's processes (``ps`` would list every VM's Envoy: one pid namespace)."""
        pids = subprocess.run(["ip", "netns", "pids", self.host.ns], capture_output=True, text=True, check=False)
        for pid in pids.stdout.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "envoy":
                    return int(pid)
            except OSError:
                continue
        return None

    def stop(self) -> None:
        for proc in (self.agent, self.app_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
