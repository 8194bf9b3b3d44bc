"""Run a DnsServer for the benchmark: ``python -m bench.dns.serve PORT TABLE UPSTREAM_HOST UPSTREAM_PORT``.

Serves the NameTable in the file TABLE (a serialized ``NameTable``, the one the local mesh pushed to
pilot-agent), forwards everything else to the upstream, prints ``READY`` once bound and the table is
loaded, and stops on SIGTERM.  Namespace and search list are the ones pilot-agent gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from vm_agent.dns import DnsServer, DnsSettings
from vm_agent.proto import nds_pb2

NAMESPACE = "vmns"
SEARCH = (f"{NAMESPACE}.svc.cluster.local", "svc.cluster.local", "cluster.local")


async def serve(port: int, table: nds_pb2.NameTable, upstream: tuple[str, int]) -> None:
    server = DnsServer(
        DnsSettings(
            listen=(("127.0.0.1", port),),
            upstreams=(upstream,),
            search_domains=SEARCH,
            pod_namespace=NAMESPACE,
            proxy_domain="svc.cluster.local",
        )
    )
    task = asyncio.create_task(server.run())
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # it cannot bind: say why instead of waiting forever
    await server.update(table)
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    port, path, host, up_port = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    table = nds_pb2.NameTable.FromString(path.read_bytes())
    asyncio.run(serve(port, table, (host, up_port)))


if __name__ == "__main__":
    main()
