"""`vm-agent run` as a real process on istioctl's files, with every port and socket private to the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.net import free_port, free_tcp_udp_port
from tests.interop.lab import short_tmp


def agent_unavailable() -> str | None:
    """Why `vm-agent run` cannot start at all in this checkout (the composition root does not import), else None."""
    res = subprocess.run(
        [sys.executable, "-c", "import vm_agent.agent"], capture_output=True, text=True, timeout=60, check=False
    )
    if res.returncode == 0:
        return None
    last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"vm_agent.agent does not import: {last}"


class AgentProc:
    def __init__(self, config_dir: Path, *, secret_ttl: str | None = None, extra: dict[str, str] | None = None) -> None:
        self.config_dir = config_dir
        self.work = short_tmp("vmag-")
        self.state_dir = self.work / "state"
        self.resolv = self.work / "resolv.conf"
        # Names not in the NameTable are forwarded here; nothing listens, the tests only ask NameTable names.
        self.resolv.write_text("nameserver 127.0.0.1\n")
        self.status_port = free_port()
        self.admin_port = free_port()
        self.dns_port = free_tcp_udp_port()
        proxy_config = {
            "configPath": str(self.work / "proxy"),
            "statusPort": self.status_port,
            "proxyAdminPort": self.admin_port,
            # No capture: listeners bind real loopback addresses and no iptables are needed.
            "interceptionMode": "NONE",
            "drainDuration": "1s",
            "terminationDrainDuration": "1s",
        }
        self.settings = {
            "VM_AGENT_SCAN_INTERFACES": "false",
            "DNS_PROXY_ADDR": f"127.0.0.1:{self.dns_port}",
            "PROXY_CONFIG": json.dumps(proxy_config),
            "VM_AGENT_SDS_SOCKET": str(self.work / "sds.sock"),
            "ENVOY_STATUS_PORT": str(free_port()),
            "ENVOY_PROMETHEUS_PORT": str(free_port()),
        }
        if secret_ttl is not None:
            self.settings["SECRET_TTL"] = secret_ttl
        self.settings.update(extra or {})
        self.log = self.work / "agent.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "vm_agent",
            "run",
            f"--config-dir={self.config_dir}",
            f"--state-dir={self.state_dir}",
            f"--resolv-conf={self.resolv}",
        ]
        argv += [f"--set={k}={v}" for k, v in self.settings.items()]
        return argv

    def start(self) -> None:
        self.runs += 1
        with self.log.open("ab") as fh:
            fh.write(f"----- run {self.runs}: {' '.join(self.argv()[:7])}\n".encode())
            fh.flush()
            self.popen = subprocess.Popen(self.argv(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Kill the whole session: Envoy is the agent's child.
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def must_be_alive(self) -> None:
        if not self.alive():
            assert self.popen is not None
            raise AssertionError(f"vm-agent run exited with {self.popen.returncode}:\n{self.tail()}")

    def get(self, port: int, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def config_dump(self) -> dict[str, Any] | None:
        code, body = self.get(self.admin_port, "/config_dump")
        if code != 200:
            return None
        data: dict[str, Any] = json.loads(body)
        return data

    def cert_chain_files(self) -> list[Path]:
        return sorted(self.state_dir.rglob("cert-chain.pem"))

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)
