"""Run a DnsServer for the benchmark: ``python -m bench.dns.serve PORT NAMES UPSTREAM_HOST UPSTREAM_PORT``.

Serves ``svcN.bench.mesh`` (N < NAMES) from a NameTable, forwards everything else to the upstream,
prints ``READY`` once bound and the table is loaded, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import uvloop

from vm_agent.dns import DnsServer, DnsSettings
from vm_agent.proto import nds_pb2


def name_table(names: int) -> nds_pb2.NameTable:
    table = nds_pb2.NameTable()
    for i in range(names):
        info = table.table[f"svc{i}.bench.mesh"]
        info.ips.append(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")
        info.registry = "External"
    return table


async def serve(port: int, names: int, upstream: tuple[str, int]) -> None:
    server = DnsServer(
        DnsSettings(
            listen=(("127.0.0.1", port),),
            upstreams=(upstream,),
            search_domains=("bench.svc.cluster.local",),
            pod_namespace="bench",
            proxy_domain="svc.cluster.local",
        )
    )
    task = asyncio.create_task(server.run())
    await server.ready.wait()
    await server.update(name_table(names))
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    port, names, host, up_port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    uvloop.run(serve(port, names, (host, up_port)))


if __name__ == "__main__":
    main()
