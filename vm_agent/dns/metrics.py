"""DNS counters.

The UDP path counts with plain integer increments on a per-server ``DnsStats`` (a prometheus
``Counter.inc`` takes a lock and costs more than answering a table hit); a collector on the agent's
registry sums them at scrape time.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from vm_agent.dns import wire
from vm_agent.metrics import REGISTRY, Collector, CounterMetricFamily, GaugeMetricFamily


class DnsStats:
    __slots__ = (
        "__weakref__",
        "fast_hits",
        "forward_failed",
        "forward_ok",
        "names",
        "outcomes",
        "rcodes",
        "upstream_failures",
    )

    def __init__(self) -> None:
        self.fast_hits = 0  # table hits answered on the fast path (always NOERROR)
        self.outcomes: dict[str, int] = {}
        self.rcodes: dict[int, int] = {}
        self.forward_ok = 0
        self.forward_failed = 0
        self.names = 0
        self.upstream_failures: dict[str, int] = {}  # "host:port" → failed exchanges (the Forwarder's dict)

    def outcome(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def rcode(self, reply: bytes) -> None:
        code = reply[3] & 0xF if len(reply) >= 4 else -1
        self.rcodes[code] = self.rcodes.get(code, 0) + 1

    def queries(self) -> dict[str, int]:
        out = dict(self.outcomes)
        out["hit"] = out.get("hit", 0) + self.fast_hits
        return out

    def responses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for code, count in list(self.rcodes.items()):
            name = wire.RCODE_NAMES.get(code, str(code))
            out[name] = out.get(name, 0) + count
        out["NOERROR"] = out.get("NOERROR", 0) + self.fast_hits
        return out


_LIVE: weakref.WeakSet[DnsStats] = weakref.WeakSet()


def register(stats: DnsStats) -> None:
    _LIVE.add(stats)


class _DnsCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        queries = CounterMetricFamily(
            "vm_agent_dns_queries", "DNS queries by result (hit, miss, unsynced, formerr, ...)", labels=["result"]
        )
        responses = CounterMetricFamily("vm_agent_dns_responses", "DNS responses sent by RCODE", labels=["rcode"])
        forwards = CounterMetricFamily("vm_agent_dns_forwards", "Queries forwarded upstream", labels=["result"])
        names = GaugeMetricFamily("vm_agent_dns_table_names", "Names answered from the NameTable")
        upstream = CounterMetricFamily(
            "vm_agent_dns_upstream_failures", "Failed exchanges with one upstream resolver", labels=["upstream"]
        )
        u_total: dict[str, int] = {}
        q_total: dict[str, int] = {}
        r_total: dict[str, int] = {}
        ok = failed = known = 0
        for stats in list(_LIVE):
            for k, v in stats.queries().items():
                q_total[k] = q_total.get(k, 0) + v
            for k, v in stats.responses().items():
                r_total[k] = r_total.get(k, 0) + v
            ok += stats.forward_ok
            failed += stats.forward_failed
            known += stats.names
            for k, v in list(stats.upstream_failures.items()):
                u_total[k] = u_total.get(k, 0) + v
        for k, v in sorted(q_total.items()):
            queries.add_metric([k], v)
        for k, v in sorted(r_total.items()):
            responses.add_metric([k], v)
        forwards.add_metric(["ok"], ok)
        forwards.add_metric(["failed"], failed)
        names.add_metric([], known)
        for k, v in sorted(u_total.items()):
            upstream.add_metric([k], v)
        yield queries
        yield responses
        yield forwards
        yield names
        yield upstream


REGISTRY.register(_DnsCollector())
