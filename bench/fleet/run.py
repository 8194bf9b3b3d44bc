"""Run N simulated VMs against the real control plane of the interop lab and measure what they cost it.

``python -m bench.fleet run --vms 1000 --mode nds --design new --out bench/results/fleet/nds-new.json``
then ``python -m bench.fleet report`` writes bench/results/fleet.md from every JSON in that folder.
``make bench-fleet`` does both for the runs in the README, under the interop and bench locks.

Scenarios, in order (``--scenarios`` picks a subset; the ramp always runs):

* ramp: every VM gets its certificate (CA calls at ``--ca-rate``/s), connects and reports; time until
  every WorkloadEntry exists, is connected and Healthy.
* steady: a quiet window; kube-apiserver's WorkloadEntry status writes per VM per hour; istiod's RSS.
* nds: one more Service in the namespace; NameTable bytes each VM receives for it.
* flip (``ads`` mode): one VM's app goes down, then up; time until every other VM's EDS shows it.
* flap: 1 % of the VMs flip every 10 s; every flip must reach its WorkloadEntry, steady VMs write nothing.
* storm: istiod restarted with every VM connected; time until all are back, registered and Healthy;
  WorkloadEntries lost or duplicated; dials istiod refused or took, against the agents' own count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.fleet.kube import (
    EntryWatch,
    FleetGroup,
    add_services,
    cpu_seconds,
    create_group,
    rss_bytes,
    status_writes,
    vm_files,
)
from bench.fleet.vm import FleetSettings, FlipWatch, SimVm
from tests.interop.lab import Binaries, ControlPlane, cache_dir, short_tmp
from vm_agent.proto import NAME_TABLE_TYPE_URL
from vm_agent.xds import ReportPolicy
from vm_agent.xds.eds_witness import address_needle

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "bench" / "results" / "fleet"
HOUR = 3600.0

NEW = ReportPolicy()
# The design before issue 15: transitions, a replay on every stream and a re-send every 60 s; no confirmation and
# no EDS check. (The heartbeat lands at a random point of each minute instead of on the minute: the same rate.)
OLD = ReportPolicy(confirm_after_s=(1e9, 1e9), settle_s=1e9, heartbeat_s=60.0)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def until(check: Callable[[], bool], timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(every)
    return check()


class Fleet:
    def __init__(self, cp: ControlPlane, args: argparse.Namespace, work: Path) -> None:
        self.cp = cp
        self.args = args
        self.work = work
        self.group = FleetGroup(
            namespace="fleet",
            name="fleet",
            service_account="fleet-sa",
            app_port=8080,
            service_port=8080,
            probe_period_s=args.probe_period,
        )
        self.flip = FlipWatch()
        self.vms: list[SimVm] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.watch = EntryWatch(cp, self.group.namespace)
        self.results: dict[str, Any] = {}

    @property
    def names(self) -> set[str]:
        return {vm.entry_name for vm in self.vms}

    def ready(self) -> int:
        return self.watch.count_ready(self.names)

    # ------------------------------------------------------------------ set-up

    async def prepare(self) -> None:
        await asyncio.to_thread(create_group, self.cp, self.group)
        files = await asyncio.to_thread(vm_files, self.cp, self.group, self.work / "files")
        (self.work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        settings = FleetSettings(
            files=files,
            work=self.work,
            mode=self.args.mode,
            policy=OLD if self.args.design == "old" else NEW,
            eds_cluster=self.group.cluster,
        )
        for i in range(self.args.vms):
            self.vms.append(SimVm(i, settings, self.flip))
            if i % 50 == 0:
                await asyncio.sleep(0)
        self.watch.start()

    def start(self) -> float:
        interval = 1.0 / self.args.ca_rate
        t0 = time.monotonic()

        def slot(i: int) -> Callable[[], Awaitable[None]]:
            async def wait() -> None:
                await asyncio.sleep(max(0.0, t0 + i * interval - time.monotonic()))

            return wait

        self.tasks = [asyncio.create_task(vm.run(slot(i)), name=f"vm{i}") for i, vm in enumerate(self.vms)]
        return t0

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        self.watch.stop()

    # ------------------------------------------------------------------ scenarios

    async def ramp(self) -> None:
        n = len(self.vms)
        rss0 = rss_bytes(self.cp)
        writes0 = status_writes(self.cp).get("PUT status", 0)
        cpu0, sim0 = cpu_seconds(self.cp), _own_cpu()
        log(f"ramp: {n} VMs, CA at {self.args.ca_rate}/s, mode {self.args.mode}, design {self.args.design}")
        t0 = self.start()
        marks: dict[str, float] = {}
        deadline = t0 + self.args.ramp_timeout
        while time.monotonic() < deadline:
            ready = self.ready()
            for frac in (0.25, 0.5, 0.9, 1.0):
                key = f"{int(frac * 100)}%"
                if key not in marks and ready >= frac * n:
                    marks[key] = time.monotonic() - t0
            if ready >= n:
                break
            await asyncio.sleep(0.5)
        cpu1, sim1 = cpu_seconds(self.cp), _own_cpu()
        await asyncio.sleep(self.args.settle)  # the confirmations, 5-15 s after each VM's first report
        writes = status_writes(self.cp).get("PUT status", 0) - writes0
        certified = [vm.certified_at - t0 for vm in self.vms if vm.certified_at is not None]
        snaps = [vm.snapshot() for vm in self.vms]
        dials = [s["dials"]["total"] for s in snaps]
        self.results["ramp"] = {
            "vms": n,
            "ready": self.ready(),
            "all_registered_healthy_s": marks.get("100%"),
            "marks_s": marks,
            "all_certified_s": max(certified) if len(certified) == n else None,
            "dials_per_vm": {"mean": statistics.mean(dials), "max": max(dials)},
            "istiod_rate_limited": self._istiod_log_count("exceeded rate limit"),
            "status_writes_per_vm": writes / n,
            "istiod_cpu_s": cpu1 - cpu0,
            "simulator_cpu_s": sim1 - sim0,
            "response_bytes_total": statistics.median(
                sum(t.get("bytes", 0) for t in s["types"].values()) for s in snaps
            ),
            "response_bytes_per_vm": {
                url.rsplit(".", 1)[-1]: statistics.median(s["types"].get(url, {}).get("bytes", 0) for s in snaps)
                for url in sorted({u for s in snaps for u in s["types"]})
            },
            "istiod_rss_before_mib": rss0 / 2**20,
        }
        log(f"ramp: {json.dumps(self.results['ramp'])}")

    async def steady(self) -> None:
        window = self.args.steady_s
        before = status_writes(self.cp)
        t0 = time.monotonic()
        rss: list[int] = []
        while time.monotonic() - t0 < window:
            rss.append(rss_bytes(self.cp))
            await asyncio.sleep(min(10.0, window - (time.monotonic() - t0)))
        after = status_writes(self.cp)
        t1 = time.monotonic()
        writes = after.get("PUT status", 0) - before.get("PUT status", 0)
        per_vm = self.watch.writes_between(self.names, t0, t1)
        n = len(self.vms)
        rss_now = statistics.median(rss)
        rss0 = self.results["ramp"]["istiod_rss_before_mib"] * 2**20
        self.results["steady"] = {
            "window_s": t1 - t0,
            "status_writes": writes,
            "status_writes_per_vm_hour": writes / n / ((t1 - t0) / HOUR),
            "vms_that_wrote": sum(1 for c in per_vm.values() if c),
            "istiod_rss_mib": rss_now / 2**20,
            "istiod_rss_per_vm_kib": (rss_now - rss0) / n / 1024,
            "other_workloadentry_requests": {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "PUT status"},
        }
        log(f"steady: {json.dumps(self.results['steady'])}")

    async def nds(self) -> None:
        n = len(self.vms)
        if self.args.services:
            # A mesh of some size first: the NameTable is sent whole, so its size is what a change costs.
            names_before = [vm.table_names for vm in self.vms]
            await asyncio.to_thread(add_services, self.cp, self.group, self.args.services)
            await until(
                lambda: all(
                    vm.table_names >= b + self.args.services for vm, b in zip(self.vms, names_before, strict=True)
                ),
                300,
            )
            await asyncio.sleep(5)
        before = [(vm.snapshot()["types"].get(NAME_TABLE_TYPE_URL, {}), vm.table_names) for vm in self.vms]
        t0 = time.monotonic()
        await asyncio.to_thread(add_services, self.cp, self.group, 1, "fleet-extra")

        def got(i: int) -> bool:
            return self.vms[i].table_names > before[i][1]

        ok = await until(lambda: all(got(i) for i in range(n)), 120)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(2)  # a second push of the same change would count too
        deltas = []
        pushes = []
        for i, vm in enumerate(self.vms):
            now = vm.snapshot()["types"].get(NAME_TABLE_TYPE_URL, {})
            deltas.append(now.get("bytes", 0) - before[i][0].get("bytes", 0))
            pushes.append(now.get("responses", 0) - before[i][0].get("responses", 0))
        self.results["nds"] = {
            "all_received": ok,
            "all_received_s": elapsed,
            "bytes_per_vm": statistics.median(deltas),
            "pushes_per_vm": statistics.median(pushes),
            "names_in_table": statistics.median(vm.table_names for vm in self.vms),
            "bytes_all_vms": sum(deltas),
        }
        log(f"nds: {json.dumps(self.results['nds'])}")

    async def flip_one(self) -> None:
        if self.args.mode != "ads":
            return
        vm = self.vms[len(self.vms) // 2]
        others = len(self.vms) - 1
        out: dict[str, Any] = {"probe_period_s": self.group.probe_period_s}
        for present, label in ((False, "down"), (True, "up")):
            self.flip.arm(address_needle(vm.address), present)
            t0 = self.flip.since
            vm.app_healthy = present
            await until(lambda: sum(1 for i in self.flip.seen if i != vm.index) >= others, 120, 0.2)
            seen = [t - t0 for i, t in self.flip.seen.items() if i != vm.index]
            out[label] = {
                "reached": len(seen),
                "of": others,
                "p50_s": pct(seen, 0.5),
                "p99_s": pct(seen, 0.99),
                "all_s": max(seen) if len(seen) >= others else None,
            }
            await asyncio.sleep(20)
        self.flip.arm(b"", True)
        self.results["flip"] = out
        log(f"flip: {json.dumps(out)}")

    async def flap(self) -> None:
        k = max(1, len(self.vms) // 100)
        rng = random.Random(15)
        flappers = rng.sample(self.vms, k)
        steady_names = self.names - {vm.entry_name for vm in flappers}
        period, duration = 10.0, self.args.flap_s
        flips: dict[int, list[bool]] = {vm.index: [] for vm in flappers}
        t0 = time.monotonic()

        async def flap_one(vm: SimVm) -> None:
            await asyncio.sleep(rng.uniform(0, period))
            while time.monotonic() - t0 < duration:
                vm.app_healthy = not vm.app_healthy
                flips[vm.index].append(vm.app_healthy)
                await asyncio.sleep(period)
            if not vm.app_healthy:
                vm.app_healthy = True
                flips[vm.index].append(True)

        log(f"flap: {k} VMs every {period:g}s for {duration:g}s")
        before = status_writes(self.cp)
        await asyncio.gather(*(flap_one(vm) for vm in flappers))
        await asyncio.sleep(self.args.settle)
        t1 = time.monotonic()
        after = status_writes(self.cp)
        lost = 0
        seen_total = 0
        for vm in flappers:
            with self.watch.lock:
                entry = self.watch.entries.get(vm.entry_name)
                states = [s for t, s in entry.states if t >= t0] if entry else []
            # Each flip must show up as its own change of the Healthy condition, in order.
            observed = [s == "True" for s in states]
            seen_total += len(observed)
            lost += max(0, len(flips[vm.index]) - len(observed))
            if observed != flips[vm.index]:
                log(f"flap: {vm.entry_name} flipped {flips[vm.index]} but its entry showed {observed}")
        flap_writes = self.watch.writes_between({vm.entry_name for vm in flappers}, t0, t1)
        steady_writes = self.watch.writes_between(steady_names, t0, t1)
        total_flips = sum(len(f) for f in flips.values())
        self.results["flap"] = {
            "flapping_vms": k,
            "period_s": period,
            "duration_s": duration,
            "flips": total_flips,
            "flips_seen_on_entries": seen_total,
            "flips_lost": lost,
            "writes_per_flip": sum(flap_writes.values()) / max(1, total_flips),
            "steady_vms_writes": sum(steady_writes.values()),
            "status_writes_total": after.get("PUT status", 0) - before.get("PUT status", 0),
        }
        log(f"flap: {json.dumps(self.results['flap'])}")

    async def storm(self) -> None:
        n = len(self.vms)
        names = self.names
        dials_before = [vm.snapshot()["dials"]["total"] for vm in self.vms]
        deleted_before = len(self.watch.deleted)
        before = status_writes(self.cp)
        log(f"storm: restarting istiod with {self.ready()} of {n} VMs connected and Healthy")
        assert self.cp.istiod is not None
        old_log = self.cp.istiod.log
        t_wall = time.time()
        t0 = time.monotonic()
        await asyncio.to_thread(self.cp.start_istiod)
        t_up = time.monotonic() - t0

        def back(vm: SimVm) -> bool:
            up = vm.snapshot()["upstream"]
            return up["state"] == "connected" and (up["last_connected_at"] or 0) > t_wall

        connected_ok = await until(lambda: all(back(vm) for vm in self.vms), self.args.ramp_timeout)
        t_connected = time.monotonic() - t0
        ready_ok = await until(lambda: self.ready() >= n, self.args.ramp_timeout)
        t_ready = time.monotonic() - t0
        await asyncio.sleep(self.args.settle)
        after = status_writes(self.cp)
        writes = after.get("PUT status", 0) - before.get("PUT status", 0)
        conflicts = after.get("PUT status conflict", 0) - before.get("PUT status conflict", 0)
        per_vm = self.watch.writes_between(names, t0, time.monotonic())
        with self.watch.lock:
            entries = set(self.watch.entries)
        snaps = [vm.snapshot() for vm in self.vms]
        dials = [s["dials"]["total"] - b for s, b in zip(snaps, dials_before, strict=True)]
        gaps = [g for s in snaps for g in s["dials"]["recent_gaps_s"]]
        log_text = self.cp.istiod_log()
        # Streams the stopping istiod still accepted: each of those VMs reconnects twice.
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_wall))
        late = [
            line
            for line in old_log.read_text(errors="replace").splitlines()
            if line[:19] >= cutoff and re.search(r"ADS: new (?:delta )?connection for node:", line)
        ]
        accepted = re.findall(r"ADS: new (?:delta )?connection for node:(\S+)", log_text)
        per_node: dict[str, int] = {}
        for con in accepted:
            node = con.rsplit("-", 1)[0]
            per_node[node] = per_node.get(node, 0) + 1
        self.results["storm"] = {
            "vms": n,
            "istiod_ready_s": t_up,
            "all_streams_back_s": t_connected if connected_ok else None,
            "all_registered_healthy_s": t_ready if ready_ok else None,
            "entries_missing": len(names - entries),
            "entries_unexpected": len(entries - names),
            "entries_deleted_during_storm": len(self.watch.deleted) - deleted_before,
            "status_writes_per_vm": writes / n,
            "status_conflicts_retried_by_istiod": conflicts,
            "status_changes_per_vm_max": max(per_vm.values()) if per_vm else None,
            "agent_dials": sum(dials),
            "agent_dials_per_vm": {"mean": statistics.mean(dials), "max": max(dials)},
            "istiod_accepted_streams": len(accepted),
            "stopping_istiod_accepted_streams": len(late),
            "istiod_accepted_per_vm_max": max(per_node.values()) if per_node else 0,
            "istiod_rate_limited": log_text.count("exceeded rate limit"),
            "istiod_not_ready_yet": log_text.count("discovery is not ready")
            + log_text.count("server is not ready to serve discovery information"),
            "min_gap_between_dials_of_one_vm_s": min(gaps) if gaps else None,
        }
        log(f"storm: {json.dumps(self.results['storm'])}")

    def _istiod_log_count(self, text: str) -> int:
        return self.cp.istiod_log().count(text)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bins = Binaries.find()
    work = short_tmp("vmaf-fleet-")
    cp = ControlPlane(bins=bins, work=work / "lab")
    (work / "lab").mkdir()
    fleet: Fleet | None = None
    started = time.time()
    try:
        log("starting the control plane (etcd, kube-apiserver, istiod)")
        await asyncio.to_thread(cp.start)
        fleet = Fleet(cp, args, work)
        await fleet.prepare()
        await fleet.ramp()
        wanted = set(args.scenarios.split(","))
        if "steady" in wanted:
            await fleet.steady()
        if "nds" in wanted:
            await fleet.nds()
        if "flip" in wanted:
            await fleet.flip_one()
        if "flap" in wanted:
            await fleet.flap()
        if "storm" in wanted:
            await fleet.storm()
        results = fleet.results
    finally:
        if fleet is not None:
            await fleet.stop()
        cp.stop()
        keep = cache_dir() / "fleet-logs"
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for component_log in (work / "lab").glob("*.log"):
            shutil.copy(component_log, keep / component_log.name)
        shutil.rmtree(work, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "args": vars(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "simulator": {"cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mib": usage.ru_maxrss / 1024},
        **results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one fleet against a fresh control plane")
    r.add_argument("--vms", type=int, default=1000)
    r.add_argument("--mode", choices=("nds", "ads"), default="nds")
    r.add_argument("--design", choices=("new", "old"), default="new")
    r.add_argument("--scenarios", default="steady,nds,flip,flap,storm")
    r.add_argument("--ca-rate", type=float, default=40.0, help="certificate requests per second")
    r.add_argument("--probe-period", type=int, default=1)
    r.add_argument("--services", type=int, default=200, help="Services in the mesh before the NameTable change")
    r.add_argument("--steady-s", type=float, default=180.0)
    r.add_argument("--flap-s", type=float, default=300.0)
    r.add_argument("--settle", type=float, default=20.0)
    r.add_argument("--ramp-timeout", type=float, default=600.0)
    r.add_argument("--out", type=Path, required=True)
    sub.add_parser("report", help="write bench/results/fleet.md from bench/results/fleet/*.json")
    args = parser.parse_args(argv)
    if args.command == "report":
        from bench.fleet.report import write_report

        write_report(OUT_DIR, ROOT / "bench" / "results" / "fleet.md")
        return 0
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from vm_agent.logs import setup

    setup("error")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(f"wrote {args.out}")
    return 0
