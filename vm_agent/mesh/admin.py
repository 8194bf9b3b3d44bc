"""The local mesh's admin HTTP API (loopback): objects, WorkloadEntries with their conditions, the
connected proxies with what was pushed and ACKed/NACKed, the NameTable per proxy; apply and delete."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from vm_agent.logs import get_logger
from vm_agent.mesh.store import CLUSTER_SCOPED, ManifestErrors, key_of, parse_yaml
from vm_agent.metrics import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

if TYPE_CHECKING:
    from vm_agent.mesh.server import MeshServer

log = get_logger("mesh.admin")

MAX_BODY = 4 << 20


def _problem(status: int, message: str, problems: list[str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = problems
    return web.json_response(body, status=status)


class AdminApi:
    def __init__(self, mesh: MeshServer) -> None:
        self._mesh = mesh

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/objects", self.objects)
        app.router.add_get("/v1/workloadentries", self.workload_entries)
        app.router.add_get("/v1/proxies", self.proxies)
        app.router.add_get("/v1/nametable", self.name_table)
        app.router.add_get("/v1/root-cert.pem", self.root_cert)
        app.router.add_post("/v1/apply", self.apply)
        app.router.add_post("/v1/delete", self.delete_manifest)
        app.router.add_delete("/v1/objects/{kind}/{namespace}/{name}", self.delete_one)
        app.router.add_get("/debug/snapshot", self.debug)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n" if self._mesh.ready.is_set() else "starting\n")

    async def objects(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind") or None
        ns = request.query.get("namespace") or None
        return web.json_response({"items": self._mesh.store.select(kind, ns)})

    async def workload_entries(self, request: web.Request) -> web.Response:
        ns = request.query.get("namespace") or None
        return web.json_response({"items": self._mesh.store.select("WorkloadEntry", ns)})

    async def proxies(self, request: web.Request) -> web.Response:
        conns = self._mesh.ads.snapshot()["connections"]
        for c in conns:
            c.pop("name_table", None)
        return web.json_response({"items": conns})

    async def name_table(self, request: web.Request) -> web.Response:
        wanted = request.query.get("proxy", "")
        out = {
            c.conn_id: c.name_table
            for c in self._mesh.ads.connections.values()
            if wanted in c.conn_id or (c.node is not None and wanted in c.node.node_id)
        }
        return web.json_response({"proxies": out})

    async def root_cert(self, request: web.Request) -> web.Response:
        return web.Response(body=self._mesh.root_cert_pem, content_type="application/x-pem-file")

    async def _read_text(self, request: web.Request) -> str:
        raw = await request.read()
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise web.HTTPBadRequest(text=f"request body: not UTF-8 ({e})") from e

    async def apply(self, request: web.Request) -> web.Response:
        text = await self._read_text(request)
        source = request.query.get("source", "admin-api")
        try:
            keys = self._mesh.apply_yaml(text, source=source)
        except ManifestErrors as e:
            return _problem(422, "manifest refused; nothing was applied", [str(p) for p in e.errors])
        log.info("applied %d object(s) from %s", len(keys), source)
        return web.json_response({"applied": [_describe(k) for k in keys]})

    async def delete_manifest(self, request: web.Request) -> web.Response:
        text = await self._read_text(request)
        source = request.query.get("source", "admin-api")
        try:
            docs = parse_yaml(text, source)
        except ManifestErrors as e:
            return _problem(422, "manifest refused; nothing was deleted", [str(p) for p in e.errors])
        deleted: list[str] = []
        missing: list[str] = []
        for doc in docs:
            kind, ns, name = key_of(doc)
            (deleted if self._mesh.delete(kind, ns, name) else missing).append(_describe((kind, ns, name)))
        return web.json_response({"deleted": deleted, "not_found": missing})

    async def delete_one(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        ns = "" if kind in CLUSTER_SCOPED else request.match_info["namespace"]
        name = request.match_info["name"]
        if not self._mesh.delete(kind, ns, name):
            return _problem(404, f"{_describe((kind, ns, name))} not found")
        return web.json_response({"deleted": [_describe((kind, ns, name))]})

    async def debug(self, request: web.Request) -> web.Response:
        return web.json_response(self._mesh.snapshot())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _describe(key: tuple[str, str, str]) -> str:
    kind, ns, name = key
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


async def serve_admin(mesh: MeshServer, host: str, port: int, started: asyncio.Future[str]) -> None:
    """Run the admin API until cancelled; ``started`` receives the base URL."""
    runner = web.AppRunner(AdminApi(mesh).app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
        started.set_result(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
