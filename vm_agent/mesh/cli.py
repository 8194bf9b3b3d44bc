"""Back-ends of ``vm-agent mesh ...`` (argument parsing lives in vm_agent/cli.py).

``serve`` runs the local mesh; ``get``/``apply``/``delete`` talk to its admin API kubectl-style;
``vm-files`` writes what ``istioctl x workload entry configure`` would (and, with ``--cloud-init``, the
same as a cloud-init user-data)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from vm_agent.files import atomic_write
from vm_agent.logs import get_logger
from vm_agent.mesh.ca import MeshCA
from vm_agent.mesh.cloudinit import CloudInitError, render_cloud_config
from vm_agent.mesh.settings import MeshSettings, split_host_port
from vm_agent.mesh.store import ManifestErrors, parse_yaml
from vm_agent.mesh.tokens import ServiceAccountIssuer
from vm_agent.mesh.vmfiles import VmFilesError, VmFilesOptions, parse_duration, render_vm_files, write_vm_files

log = get_logger("mesh.cli")

DEFAULT_ADMIN_URL = "http://127.0.0.1:15014"
RUNTIME_FILE = "mesh.json"
USER_DATA = "user-data"  # the name a NoCloud seed gives it
GET_KINDS = ("workloadentries", "proxies", "nametable")
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class MeshCliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def runtime_info(state: Path | None) -> dict[str, Any]:
    if state is None:
        return {}
    path = state / RUNTIME_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def admin_url_for(admin_url: str | None, state: Path | None) -> str:
    return (admin_url or runtime_info(state).get("admin_url") or DEFAULT_ADMIN_URL).rstrip("/")


async def _request(method: str, url: str, body: str | None = None) -> Any:
    try:
        async with (
            aiohttp.ClientSession(timeout=_TIMEOUT) as session,
            session.request(method, url, data=body.encode() if body is not None else None) as resp,
        ):
            text = await resp.text()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = {"error": text.strip()}
            if resp.status >= 400:
                problems = "".join(f"\n  {p}" for p in data.get("problems", []))
                raise MeshCliError(f"{method} {url}: HTTP {resp.status}: {data.get('error', '')}{problems}")
            return data
    except aiohttp.ClientError as e:
        raise MeshCliError(f"cannot reach the mesh admin API at {url}: {e} (is `vm-agent mesh serve` running?)") from e


# -- serve ------------------------------------------------------------------------------------------


async def mesh_serve(settings: MeshSettings) -> int:
    """Run the local mesh until SIGINT/SIGTERM."""
    from vm_agent.mesh.server import MeshServer

    try:
        mesh = MeshServer(settings)
    except (ValueError, OSError) as e:
        print(f"vm-agent mesh serve: {e}", file=sys.stderr)
        return 2
    task = asyncio.create_task(mesh.run(), name="mesh")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    ready = asyncio.create_task(mesh.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if mesh.ready.is_set():
        print(
            f"local mesh (not istiod) serving CA + ADS on {mesh.xds_address} (TLS), admin on {mesh.admin_url}",
            file=sys.stderr,
        )
    else:
        ready.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return 0
    except OSError as e:
        print(f"vm-agent mesh serve: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return 0


# -- get / apply / delete ---------------------------------------------------------------------------


def _entry_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["NAMESPACE", "NAME", "ADDRESS", "HEALTHY", "CONNECTED"]]
    for e in items:
        meta = e.get("metadata", {})
        ann = meta.get("annotations") or {}
        conds = (e.get("status") or {}).get("conditions") or []
        healthy = next((c.get("status", "") for c in conds if c.get("type") == "Healthy"), "-")
        connected = "yes" if "istio.io/connectedAt" in ann else ("no" if "istio.io/disconnectedAt" in ann else "-")
        rows.append(
            [meta.get("namespace", ""), meta.get("name", ""), e.get("spec", {}).get("address", ""), healthy, connected]
        )
    return rows


def _proxy_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["ID", "NODE", "FLAVOR", "IDENTITY", "ACKED", "NACKED"]]
    for p in items:
        types = p.get("types", {})
        acked = ",".join(t.rsplit(".", 1)[-1] for t, s in sorted(types.items()) if s.get("acked"))
        nacked = ",".join(t.rsplit(".", 1)[-1] for t, s in sorted(types.items()) if s.get("nacked"))
        ident = ",".join(p.get("identities") or []) or "-"
        rows.append([p.get("id", ""), p.get("node_id") or "", p.get("flavor", ""), ident, acked or "-", nacked or "-"])
    return rows


def _nametable_rows(proxies: dict[str, Any]) -> list[list[str]]:
    rows = [["PROXY", "HOST", "IPS", "REGISTRY"]]
    for pid, table in sorted(proxies.items()):
        for host, info in sorted(((table or {}).get("table") or {}).items()):
            rows.append([pid, host, ",".join(info.get("ips", [])), info.get("registry", "")])
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)


async def mesh_get(
    what: str,
    *,
    output: str = "table",
    admin_url: str | None = None,
    state: Path | None = None,
    namespace: str | None = None,
    proxy: str | None = None,
    out: TextIO | None = None,
) -> int:
    """``vm-agent mesh get workloadentries|proxies|nametable [-o json|yaml]``."""
    stream = out or sys.stdout
    if what not in GET_KINDS:
        print(f"vm-agent mesh get: {what!r} is not one of {', '.join(GET_KINDS)}", file=sys.stderr)
        return 2
    if output not in ("table", "json", "yaml"):
        print(f"vm-agent mesh get: -o {output!r}: expected json or yaml", file=sys.stderr)
        return 2
    base = admin_url_for(admin_url, state)
    try:
        if what == "workloadentries":
            q = f"?namespace={namespace}" if namespace else ""
            data: Any = (await _request("GET", f"{base}/v1/workloadentries{q}"))["items"]
            rows = _entry_rows(data)
        elif what == "proxies":
            data = (await _request("GET", f"{base}/v1/proxies"))["items"]
            rows = _proxy_rows(data)
        else:
            q = f"?proxy={proxy}" if proxy else ""
            data = (await _request("GET", f"{base}/v1/nametable{q}"))["proxies"]
            rows = _nametable_rows(data)
    except MeshCliError as e:
        print(f"vm-agent mesh get: {e}", file=sys.stderr)
        return 1
    if output == "json":
        stream.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    elif output == "yaml":
        stream.write(yaml.safe_dump(data, sort_keys=True, default_flow_style=False))
    else:
        stream.write(_table(rows))
    return 0


def _read_manifest(file: Path) -> str:
    if str(file) == "-":
        return sys.stdin.read()
    return file.read_text()


async def _apply_or_delete(verb: str, file: Path, admin_url: str | None, state: Path | None, out: TextIO | None) -> int:
    stream = out or sys.stdout
    try:
        text = _read_manifest(file)
        parse_yaml(text, str(file))  # refuse locally first: the same messages, no round trip
        data = await _request("POST", f"{admin_url_for(admin_url, state)}/v1/{verb}?source={file}", text)
    except ManifestErrors as e:
        print(f"vm-agent mesh {verb}: manifest refused:\n{e}", file=sys.stderr)
        return 1
    except (OSError, MeshCliError) as e:
        print(f"vm-agent mesh {verb}: {e}", file=sys.stderr)
        return 1
    if verb == "apply":
        for name in data.get("applied", []):
            stream.write(f"{name} applied\n")
    else:
        for name in data.get("deleted", []):
            stream.write(f"{name} deleted\n")
        for name in data.get("not_found", []):
            stream.write(f"{name} not found\n")
    return 0


async def mesh_apply(
    file: Path, *, admin_url: str | None = None, state: Path | None = None, out: TextIO | None = None
) -> int:
    """``vm-agent mesh apply -f FILE`` (``-`` reads stdin)."""
    return await _apply_or_delete("apply", file, admin_url, state, out)


async def mesh_delete(
    file: Path, *, admin_url: str | None = None, state: Path | None = None, out: TextIO | None = None
) -> int:
    """``vm-agent mesh delete -f FILE``."""
    return await _apply_or_delete("delete", file, admin_url, state, out)


# -- vm-files ---------------------------------------------------------------------------------------


async def _objects_from_admin(base: str, namespace: str) -> list[dict[str, Any]] | None:
    try:
        data = await _request("GET", f"{base}/v1/objects")
    except MeshCliError:
        return None
    items = data.get("items")
    return items if isinstance(items, list) else None


def _objects_from_folder(folder: Path) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    if not folder.is_dir():
        return objects
    for path in sorted(folder.iterdir()):
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            objects += parse_yaml(path.read_text(), str(path))
    return objects


def _sa_exists(objects: list[dict[str, Any]], namespace: str, name: str) -> bool:
    for o in objects:
        meta = o.get("metadata") or {}
        if (
            o.get("kind") == "ServiceAccount"
            and meta.get("name") == name
            and (meta.get("namespace") or "default") == namespace
        ):
            return True
    if name != "default":
        return False
    return namespace == "default" or any(
        o.get("kind") == "Namespace" and (o.get("metadata") or {}).get("name") == namespace for o in objects
    )


async def mesh_vm_files(
    *,
    state: Path,
    group: str,
    namespace: str,
    out: Path,
    token_ttl: str = "1h",  # noqa: S107 (a duration, not a secret)
    ingress_ip: str | None = None,
    internal_ip: str | None = None,
    cluster_id: str | None = None,
    autoregister: bool = False,
    capture_dns: bool = True,
    admin_url: str | None = None,
    manifests: Path | None = None,
    cloud_init_package: str | None = None,
) -> int:
    """``vm-agent mesh vm-files``: the five files of ``istioctl x workload entry configure``; with
    ``cloud_init_package`` also ``user-data``, a #cloud-config placing them and installing that package."""
    try:
        info = runtime_info(state)
        base = admin_url_for(admin_url, state)
        # An explicit --manifests folder wins; else the running mesh; else its (or the state's) folder.
        objects = await _objects_from_admin(base, namespace) if (admin_url or info) and not manifests else None
        source = f"the mesh admin API at {base}"
        if objects is None:
            folder = manifests or (Path(info["manifests_dir"]) if info.get("manifests_dir") else state / "manifests")
            objects = _objects_from_folder(folder)
            source = f"the manifests in {folder}"
        wg = next(
            (
                o
                for o in objects
                if o.get("kind") == "WorkloadGroup"
                and (o.get("metadata") or {}).get("name") == group
                and ((o.get("metadata") or {}).get("namespace") or "default") == namespace
            ),
            None,
        )
        if wg is None:
            raise MeshCliError(f"WorkloadGroup {namespace}/{group} not found in {source}")
        wg = dict(wg)
        wg.setdefault("metadata", {}).setdefault("namespace", namespace)
        sa = ((wg.get("spec") or {}).get("template") or {}).get("serviceAccount") or "default"
        if not _sa_exists(objects, namespace, sa):
            raise MeshCliError(f"ServiceAccount {namespace}/{sa} (the group's template.serviceAccount) does not exist")
        ttl = parse_duration(token_ttl)
        xds_port, xds_host = 15012, None
        if info.get("xds_address"):
            xds_host, xds_port = split_host_port(str(info["xds_address"]), "mesh.json xds_address")
        trust_domain = str(info.get("trust_domain") or "cluster.local")
        ca = MeshCA(state / "ca", trust_domain)
        token = ServiceAccountIssuer(state).mint(namespace, sa, ("istio-ca",), ttl)
        opts = VmFilesOptions(
            cluster_id=cluster_id or str(info.get("cluster_id") or "Kubernetes"),
            trust_domain=trust_domain,
            ingress_ip=ingress_ip or xds_host,
            internal_ip=internal_ip,
            autoregister=autoregister,
            capture_dns=capture_dns,
            xds_port=xds_port,
        )
        files = render_vm_files(wg, token, ca.root_cert_pem, opts)
        user_data = render_cloud_config(files, cloud_init_package) if cloud_init_package is not None else None
        write_vm_files(out, files)
        if user_data is not None:
            atomic_write(out / USER_DATA, user_data.encode(), 0o600)
    except (MeshCliError, VmFilesError, CloudInitError, ManifestErrors, OSError, ValueError) as e:
        print(f"vm-agent mesh vm-files: {e}", file=sys.stderr)
        return 1
    if not opts.ingress_ip:
        print("warning: no ingress IP known; hosts was written empty (pass --ingress-ip)", file=sys.stderr)
    print(
        f"warning: a security token for namespace {namespace!r} and service account {sa!r} has been written to "
        f"{out / 'istio-token'}; it must be copied to the VM and protected",
        file=sys.stderr,
    )
    if user_data is not None:
        print(f"cloud-init user-data (holds the token too) written to {out / USER_DATA}", file=sys.stderr)
    return 0
