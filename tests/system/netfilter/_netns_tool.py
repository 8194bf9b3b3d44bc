"""Small network actors run inside a test's namespace with ``ip netns exec <ns> python _netns_tool.py``.

Each server prints ``ready`` once bound so the test can go on; clients print what they got. An
actor may drop to another uid/gid first, because the capture rules treat the proxy's uid/gid
differently from everybody else's.
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import sys
import threading


def drop_to(uid: int | None, gid: int | None) -> None:
    group = gid if gid is not None else uid
    if group is None:
        return
    os.setgroups([])
    os.setgid(group)
    if uid is not None:
        os.setuid(uid)


def listen_tcp(host: str, port: int, tag: str) -> None:
    """Answer every connection with ``tag``: the test learns which listener a connection reached."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(tag.encode() + b"\n")


def connect_tcp(host: str, port: int, source: str | None, timeout: float) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        try:
            sock.connect((host, port))
            data = sock.recv(200)
        except OSError as err:
            print(f"error: {type(err).__name__}: {err}", flush=True)
            return 1
    print(data.decode().strip(), flush=True)
    return 0


def dns_upstream(host: str, port: int, answer: str) -> None:
    """A resolver that answers every A question with ``answer`` over UDP and TCP."""
    from dnslib import QTYPE, RR, A, DNSRecord

    def reply(data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        response = request.reply()
        if request.q.qtype == QTYPE.A:
            response.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(answer), ttl=30))
        return bytes(response.pack())

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(reply(data), self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            size = int.from_bytes(self.rfile.read(2), "big")
            out = reply(self.rfile.read(size))
            self.wfile.write(len(out).to_bytes(2, "big") + out)

    udp = socketserver.ThreadingUDPServer((host, port), Udp)
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    tcp = socketserver.ThreadingTCPServer((host, port), Tcp)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print("ready", flush=True)
    udp.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uid", type=int, default=None, help="drop to this uid (and gid, unless --gid)")
    parser.add_argument("--gid", type=int, default=None, help="switch the primary group only (uid stays)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("listen")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("tag")
    p = sub.add_parser("connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--source")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("dns-upstream")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("answer")
    args = parser.parse_args()
    drop_to(args.uid, args.gid)
    if args.cmd == "listen":
        listen_tcp(args.host, args.port, args.tag)
    elif args.cmd == "connect":
        return connect_tcp(args.host, args.port, args.source, args.timeout)
    elif args.cmd == "dns-upstream":
        dns_upstream(args.host, args.port, args.answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
