"""The application on a lab VM, and the hands the test uses inside that VM. Standard library only.

It runs inside the VM's namespace as the application's user (never the proxy's), so everything it sends goes
through the VM's capture rules exactly like a real application's traffic:

* an HTTP app (``--http-port``) that answers every GET with its name, version, the path and the headers it
  received (the test reads Envoy's x-forwarded-client-cert there); ``/ready`` answers 200 or 503 as told and
  records when each probe came;
* a TCP echo (``--tcp-port``);
* a control socket (a Unix socket, reachable from the test process in any namespace) taking one JSON command per
  connection: resolve names with the system resolver, make HTTP requests with urllib, run a steady request stream,
  echo bytes over TCP, send raw bytes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class State:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.ready = True
        self.probes: list[tuple[float, int]] = []
        self.served = 0
        self.streams: dict[str, Stream] = {}
        self.lock = threading.Lock()


def make_http_server(state: State, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.startswith("/ready"):
                code = 200 if state.ready else 503
                with state.lock:
                    state.probes.append((time.time(), code))
                body = b"ok" if code == 200 else b"app says not ready"
                ctype = "text/plain"
            else:
                if self.path.startswith("/slow"):
                    # /slow?ms=N: an in-flight request a drain must let finish.
                    time.sleep(int(self.path.partition("ms=")[2] or "1000") / 1000)
                with state.lock:
                    state.served += 1
                code = 200
                body = json.dumps(
                    {
                        "app": state.name,
                        "version": state.version,
                        "path": self.path,
                        "peer": self.client_address[0],
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                ).encode()
                ctype = "application/json"
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

        def server_bind(self) -> None:
            # HTTPServer.server_bind asks DNS for the bind address's name (getfqdn): not worth a lookup.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "vmapp", port

    server = Server(("0.0.0.0", port), Handler)
    return server


def serve_tcp_echo(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)

    def echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


# ----------------------------------------------------------------------------------------------- client side


def resolve(name: str) -> dict[str, Any]:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return {"error": f"{exc.errno}: {exc.strerror}"}
    return {"addresses": sorted({str(i[4][0]) for i in infos})}


def http_get(url: str, timeout: float, headers: dict[str, str]) -> dict[str, Any]:
    t0 = time.time()
    result: dict[str, Any] = {"t0": t0}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            result["status"] = int(resp.status)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        result["status"] = int(exc.code)
    except Exception as exc:
        result["status"] = 0
        result["error"] = f"{type(exc).__name__}: {exc}"
        raw = b""
    result["t1"] = time.time()
    try:
        doc = json.loads(raw)
        result["app"] = doc.get("app")
        result["version"] = doc.get("version")
        result["headers"] = doc.get("headers", {})
    except (ValueError, AttributeError):
        result["body"] = raw[:300].decode(errors="replace")
    return result


class Stream:
    """A steady stream of requests (or lookups) until stopped; every attempt is recorded."""

    def __init__(self, kind: str, target: str, interval: float, timeout: float) -> None:
        self.kind, self.target, self.interval, self.timeout = kind, target, interval, timeout
        self.records: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.kind == "http":
                rec = http_get(self.target, self.timeout, {})
                rec.pop("headers", None)
            else:
                t0 = time.time()
                rec = {"t0": t0, **resolve(self.target), "t1": time.time()}
            self.records.append(rec)
            self.stop.wait(self.interval)


def tcp_echo(host: str, port: int, size: int, timeout: float) -> dict[str, Any]:
    payload = os.urandom(size)
    out: dict[str, Any] = {"sent": 0, "received": 0}
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            received = bytearray()

            def reader() -> None:
                while len(received) < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    received.extend(chunk)

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            conn.sendall(payload)
            out["sent"] = size
            t.join(timeout)
            out["received"] = len(received)
            out["identical"] = bytes(received) == payload
            out["sha256_sent"] = hashlib.sha256(payload).hexdigest()
            out["sha256_received"] = hashlib.sha256(bytes(received)).hexdigest()
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def send_raw(host: str, port: int, data: bytes, udp: bool, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        if udp:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect((host, port))
                s.send(data)
                out["reply"] = base64.b64encode(s.recv(65535)).decode()
        else:
            with socket.create_connection((host, port), timeout=timeout) as s:
                out["connected"] = True
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while len(reply) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                out["reply"] = base64.b64encode(reply[:4096]).decode()
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def handle(state: State, cmd: dict[str, Any]) -> Any:
    op = cmd["op"]
    if op == "ping":
        return {"name": state.name, "uid": os.getuid(), "pid": os.getpid()}
    if op == "set_ready":
        state.ready = bool(cmd["ready"])
        return {"ready": state.ready, "t": time.time()}
    if op == "probes":
        with state.lock:
            return {"probes": list(state.probes)}
    if op == "served":
        return {"served": state.served}
    if op == "resolve":
        return resolve(cmd["name"])
    if op == "get":
        headers = cmd.get("headers") or {}
        count, workers = cmd.get("count", 1), cmd.get("concurrency", 1)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(http_get, cmd["url"], cmd.get("timeout", 5.0), headers) for _ in range(count)]
            return {"results": [f.result() for f in futures]}
    if op == "stream_start":
        state.streams[cmd["id"]] = Stream(
            cmd.get("kind", "http"), cmd["target"], cmd.get("interval", 0.05), cmd.get("timeout", 5.0)
        )
        return {"started": cmd["id"]}
    if op == "stream_stop":
        stream = state.streams.pop(cmd["id"])
        stream.stop.set()
        stream.thread.join(30)
        return {"records": stream.records}
    if op == "tcp_echo":
        return tcp_echo(cmd["host"], cmd["port"], cmd["size"], cmd.get("timeout", 30.0))
    if op == "send_raw":
        return send_raw(
            cmd["host"], cmd["port"], base64.b64decode(cmd["data"]), cmd.get("udp", False), cmd.get("timeout", 3.0)
        )
    if op == "connect":
        try:
            with socket.create_connection((cmd["host"], cmd["port"]), timeout=cmd.get("timeout", 2.0)):
                return {"ok": True}
        except OSError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    raise ValueError(f"unknown op {op!r}")


def serve_control(state: State, path: str) -> None:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            try:
                reply = {"ok": handle(state, json.loads(line))}
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    if os.path.exists(path):
        os.unlink(path)
    server = socketserver.ThreadingUnixStreamServer(path, Handler)
    server.daemon_threads = True
    server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--version", default="")
    p.add_argument("--control", required=True)
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--tcp-port", type=int, default=0)
    ns = p.parse_args()
    state = State(ns.name, ns.version)
    if ns.http_port:
        server = make_http_server(state, ns.http_port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if ns.tcp_port:
        threading.Thread(target=serve_tcp_echo, args=(ns.tcp_port,), daemon=True).start()
    parent = os.getppid()

    def orphan_watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True).start()
    serve_control(state, ns.control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
