"""The commands `make demo` suggests at the end exist on a fresh machine (no dig, no curl) and work."""

from __future__ import annotations

import http.server
import shlex
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

from tests.helpers.net import free_tcp_udp_port
from vm_agent.demo import try_commands


class _OneName(BaseResolver):  # type: ignore[misc]
    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        if str(request.q.qname) == "hello.demo.svc.cluster.local." and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("10.96.0.7"), ttl=30))
        return reply


@pytest.fixture
def dns_port() -> Iterator[int]:
    port = free_tcp_udp_port()
    server = DNSServer(_OneName(), port=port, address="127.0.0.1")
    server.start_thread()
    try:
        yield port
    finally:
        server.stop()


@pytest.fixture
def http_url() -> Iterator[str]:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the demo\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def test_without_dig_and_curl_the_suggested_commands_exist_and_answer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dns_port: int, http_url: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with neither dig nor curl (nor vm-agent on PATH)
    status, query, fetch, entries = try_commands(
        "http://127.0.0.1:15020", dns_port, "hello.demo.svc.cluster.local", http_url, "http://127.0.0.1:15014"
    )
    for hint in (status, query, fetch, entries):
        program = shlex.split(hint)[0]
        assert Path(program).is_file(), f"{hint!r}: {program} does not exist"
        assert "dig" not in hint.split() and "curl" not in hint.split()

    answered = subprocess.run(shlex.split(query), capture_output=True, text=True, timeout=30)
    assert answered.returncode == 0 and "10.96.0.7" in answered.stdout, answered.stdout + answered.stderr
    fetched = subprocess.run(shlex.split(fetch), capture_output=True, text=True, timeout=30)
    assert fetched.returncode == 0 and "hello from the demo" in fetched.stdout, fetched.stderr
    version = subprocess.run([*shlex.split(status)[:-3], "version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("vm-agent "), version.stderr
