"""A tiny application for traffic tests: it answers with its name, the path and the headers it received
(so a test can read Envoy's x-forwarded-client-cert), served from a thread on a loopback port."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def echo_app(name: str, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"app": name, "path": self.path, "headers": dict(self.headers.items())}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, 0), Handler)


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[int]:
    """Serve from a thread; yields the port; shuts the server down on exit."""
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def get_json(
    port: int, path: str, *, host: str | None = None, ip: str = "127.0.0.1", timeout: float = 10
) -> tuple[int, dict[str, Any]]:
    """GET and decode the echo app's JSON reply (an empty dict when the reply is not JSON, e.g. Envoy's 503)."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if resp.getheader("content-type") == "application/json" else {})
    finally:
        conn.close()
