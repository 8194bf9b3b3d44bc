"""Run the real DNS proxy (vm_agent.dns.DnsServer) inside a test namespace, as the proxy uid.

``ip netns exec <ns> python _dns_in_netns.py --uid 1337 --listen 127.0.0.1:15053
--upstream 127.0.0.53:53 --name reviews.bookinfo.svc.cluster.local=10.96.0.10``
prints ``ready`` once it listens with the NameTable loaded, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import encodings.idna  # noqa: F401  (see main: imported while still root)
import os
import sys

from vm_agent.dns import DnsServer, DnsSettings
from vm_agent.proto import nds_pb2


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(args: argparse.Namespace) -> None:
    table = nds_pb2.NameTable()
    for item in args.name:
        name, _, ips = item.partition("=")
        info = table.table[name]
        info.ips.extend(ips.split(","))
        info.registry = "Kubernetes"
        parts = name.split(".")
        info.shortname, info.namespace = parts[0], parts[1]
    server = DnsServer(
        DnsSettings(
            listen=tuple(_addr(a) for a in args.listen),
            upstreams=tuple(_addr(u) for u in args.upstream),
            search_domains=(),
            pod_namespace="bookinfo",
            proxy_domain="svc.cluster.local",
            forward_timeout=2.0,
        )
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.run())
        await server.ready.wait()
        await server.update(table)
        print("ready", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uid", type=int, default=None)
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--upstream", action="append", default=[])
    parser.add_argument("--name", action="append", default=[], help="FQDN=ip[,ip]")
    args = parser.parse_args()
    if args.uid is not None:
        # The capture rules exempt this uid/gid: that is what lets the proxy's forwarded queries out.
        # Python here may live under a root-only directory, so every lazily imported module the
        # proxy needs (getaddrinfo's idna codec) is imported above, before giving up root.
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
