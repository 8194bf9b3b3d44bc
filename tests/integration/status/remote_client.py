"""Runs inside a test-made network namespace: a StatusServer on 0.0.0.0 and a client from a non-loopback address.

Prints one JSON object: path → status code, for each control/debug endpoint, seen from that client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import aiohttp

from vm_agent.status import StatusServer, StatusSettings


async def main(address: str, port: int, metrics_localhost_only: bool) -> None:
    async def ready() -> str | None:
        return None

    quits: list[int] = []

    async def on_quit() -> None:
        quits.append(1)

    server = StatusServer(
        StatusSettings(listen_host="0.0.0.0", port=port, metrics_localhost_only=metrics_localhost_only),
        envoy_ready=ready,
        snapshots={"x": dict},
        ndsz=dict,
        on_quit=on_quit,
        on_drain=on_quit,
    )
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.ready.wait(), 10)
    results: dict[str, int] = {}
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        for method, path in [
            ("GET", "/healthz/ready"),
            ("GET", "/stats/prometheus"),
            ("POST", "/quitquitquit"),
            ("GET", "/quitquitquit"),
            ("POST", "/drain"),
            ("GET", "/debug/ndsz"),
            ("GET", "/debug/status"),
        ]:
            async with session.request(method, f"http://{address}:{port}{path}") as resp:
                results[f"{method} {path}"] = resp.status
    results["callbacks"] = len(quits)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["metrics-localhost-only"]))
