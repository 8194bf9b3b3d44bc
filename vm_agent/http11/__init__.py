"""HTTP/1.1 on asyncio streams for the agent's few HTTP needs: the status server, Envoy's admin API, HTTP probes.

A framework (aiohttp) costs the agent ~14 MiB and ~0.1 s of imports for these three small jobs; see
bench/results/memory.md.
"""

from vm_agent.http11.client import ConnectError, Reply, authority, fetch
from vm_agent.http11.message import Headers, HttpError
from vm_agent.http11.server import Handler, HttpServer, Request, Response, start_server

__all__ = [
    "ConnectError",
    "Handler",
    "Headers",
    "HttpError",
    "HttpServer",
    "Reply",
    "Request",
    "Response",
    "authority",
    "fetch",
    "start_server",
]
