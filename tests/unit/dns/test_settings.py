"""DnsSettings validation and Istio's localhost listen rule."""

from __future__ import annotations

from typing import Any

import pytest

from vm_agent.dns import DnsSettings, default_listen


def settings(**kw: Any) -> DnsSettings:
    base: dict[str, Any] = {
        "listen": (("127.0.0.1", 15053),),
        "upstreams": (("10.0.0.2", 53),),
        "search_domains": ("ns1.svc.cluster.local",),
        "pod_namespace": "ns1",
        "proxy_domain": "svc.cluster.local",
    }
    base.update(kw)
    return DnsSettings(**base)


def test_defaults() -> None:
    s = settings()
    assert (s.forward_timeout, s.forward_parallel) == (5.0, False)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"listen": ()}, r"DnsSettings.listen: at least one"),
        ({"listen": (("localhost", 15053),)}, r"DnsSettings.listen\[0\]: 'localhost' is not an IP"),
        ({"listen": (("127.0.0.1", 70000),)}, r"port 70000 is not in 0..65535"),
        ({"upstreams": (("10.0.0.2", 53), ("dns.google", 53))}, r"DnsSettings.upstreams\[1\]"),
        ({"search_domains": ("a..b",)}, r"DnsSettings.search_domains\[0\]: .*empty label"),
        ({"forward_timeout": 0}, r"DnsSettings.forward_timeout: 0 must be > 0"),
    ],
)
def test_bad_settings_name_the_field(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**kw)


def test_default_listen_follows_resolver_families() -> None:
    assert default_listen([("10.0.0.2", 53)]) == (("127.0.0.1", 15053),)
    assert default_listen([("fd00::53", 53)]) == (("::1", 15053),)
    assert default_listen([("10.0.0.2", 53), ("fd00::53", 53)], 5353) == (("127.0.0.1", 5353), ("::1", 5353))
    assert default_listen([]) == (("127.0.0.1", 15053),)
