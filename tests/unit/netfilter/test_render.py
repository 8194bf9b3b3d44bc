"""Rendering is pure: settings in, rule text out. Expectations are §11.2 of istio-agent.md with the
chain prefix ISTIO_ → VMAGENT_, plus our documented additions (protected ports, own chains)."""

from __future__ import annotations

import shlex

import pytest

from tests.helpers.fixtures import ISTIOCTL_FIXTURES
from vm_agent.netfilter import (
    CaptureSettings,
    CaptureSettingsError,
    capture_enabled,
    parse_iptables_save,
    render,
    render_iptables,
    render_nft,
    settings_from_env,
)
from vm_agent.netfilter.backend import _reconcile_text
from vm_agent.netfilter.render import iptables_tables

FIXTURES = ISTIOCTL_FIXTURES

# §11.2 "default VM": REDIRECT mode, inbound *, outbound *, DNS capture, one v4 resolver R,
# UID = GID = 1337, R = 127.0.0.53, ISTIO_LOCAL_EXCLUDE_PORTS = 22,15090,15021,15020.
ISTIO_11_2_NAT_OUTPUT = """\
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
"""
ISTIO_11_2_RAW = """\
*raw
:ISTIO_OUTPUT_DNS - [0:0]
:ISTIO_INBOUND - [0:0]
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2
-A PREROUTING -j ISTIO_INBOUND
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 127.0.0.53/32 -j CT --zone 2
-A ISTIO_INBOUND -p udp --sport 53 -s 127.0.0.53/32 -j CT --zone 1
COMMIT
"""


def ours(istio: str) -> str:
    return istio.replace("ISTIO_", "VMAGENT_")


def default_vm() -> CaptureSettings:
    return CaptureSettings(local_exclude_ports=(22, 15090, 15021, 15020), dns_servers_v4=("127.0.0.53",))


def chain_rules(text: str, table: str, *chains: str) -> list[str]:
    """Rules of ``table`` that are appended to one of ``chains``, in order."""
    section = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return [line for line in section.splitlines() if line.startswith("-A ") and line.split()[1] in chains]


def test_default_vm_output_rules_are_istio_11_2() -> None:
    v4, v6 = render_iptables(default_vm())
    assert v6 is None
    got = chain_rules(v4, "nat", "OUTPUT", "VMAGENT_OUTPUT", "VMAGENT_OUTPUT_DNS")
    assert got == ours(ISTIO_11_2_NAT_OUTPUT).splitlines()


def test_default_vm_raw_zones_are_istio_11_2() -> None:
    v4, _ = render_iptables(default_vm())
    assert "*raw\n" + v4.split("*raw\n", 1)[1] == ours(ISTIO_11_2_RAW)


def test_default_vm_inbound_returns_ssh_and_agent_ports_then_redirects() -> None:
    v4, _ = render_iptables(default_vm())
    rules = chain_rules(v4, "nat", "PREROUTING", "VMAGENT_INBOUND", "VMAGENT_IN_REDIRECT", "VMAGENT_REDIRECT")
    assert rules[:4] == [
        "-A VMAGENT_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A VMAGENT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A VMAGENT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j VMAGENT_INBOUND",
    ]
    returned = [int(r.split("--dport ")[1].split()[0]) for r in rules if r.endswith("-j RETURN")]
    assert returned[0] == 15008
    assert returned[1] == 22
    # Istio's list plus every port of Envoy and the agent, each once.
    assert set(returned) == {15008, 22, 15000, 15001, 15004, 15006, 15020, 15021, 15053, 15090}
    assert len(returned) == len(set(returned))
    assert rules[-1] == "-A VMAGENT_INBOUND -p tcp -j VMAGENT_IN_REDIRECT"


def test_every_chain_is_declared_before_use_and_is_ours() -> None:
    v4, _ = render_iptables(default_vm())
    for table in ("nat", "raw"):
        section = v4.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
        declared = {line[1:].split()[0] for line in section.splitlines() if line.startswith(":")}
        assert all(name.startswith("VMAGENT_") for name in declared)
        for line in section.splitlines():
            if line.startswith("-A "):
                chain = line.split()[1]
                assert chain in declared or chain in ("PREROUTING", "OUTPUT"), line


def test_without_dns_capture_loopback_rules_lose_the_port_53_exception() -> None:
    v4, _ = render_iptables(CaptureSettings(dns_capture=False, dns_servers_v4=("127.0.0.53",)))
    assert "*raw" not in v4
    assert "OUTPUT_DNS" not in v4
    assert "15053 -j" not in v4.replace("--dport 15053", "")
    rules = chain_rules(v4, "nat", "VMAGENT_OUTPUT")
    assert rules[1:4] == [
        "-A VMAGENT_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 "
        "-j VMAGENT_IN_REDIRECT",
        "-A VMAGENT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A VMAGENT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    ]


def test_dns_capture_without_any_resolver_is_off_like_istio() -> None:
    s = CaptureSettings(dns_capture=True)
    assert not s.redirect_dns
    assert render(s, "iptables") == render(CaptureSettings(dns_capture=False), "iptables")


def test_capture_all_dns_redirects_every_port_53() -> None:
    v4, _ = render_iptables(CaptureSettings(capture_all_dns=True))
    assert chain_rules(v4, "nat", "VMAGENT_OUTPUT_DNS") == [
        "-A VMAGENT_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-A VMAGENT_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053",
    ]
    assert chain_rules(v4, "raw", "VMAGENT_INBOUND") == ["-A VMAGENT_INBOUND -p udp --sport 53 -j CT --zone 1"]


def test_inbound_port_list_still_protects_ssh() -> None:
    v4, _ = render_iptables(CaptureSettings(inbound_ports="8080, 22", dns_capture=False))
    rules = chain_rules(v4, "nat", "VMAGENT_INBOUND")
    ssh_return = rules.index("-A VMAGENT_INBOUND -p tcp --dport 22 -j RETURN")
    assert rules.index("-A VMAGENT_INBOUND -p tcp --dport 22 -j VMAGENT_IN_REDIRECT") > ssh_return
    assert rules[-2:] == [
        "-A VMAGENT_INBOUND -p tcp --dport 8080 -j VMAGENT_IN_REDIRECT",
        "-A VMAGENT_INBOUND -p tcp --dport 22 -j VMAGENT_IN_REDIRECT",
    ]
    assert "-p tcp -j VMAGENT_IN_REDIRECT" not in v4


def test_empty_inbound_ports_means_no_inbound_capture() -> None:
    v4, _ = render_iptables(CaptureSettings(inbound_ports="", dns_capture=False))
    assert "-A PREROUTING" not in v4
    assert "VMAGENT_IN_REDIRECT" in v4  # still needed for the app-calls-itself loopback rule


def test_outbound_cidrs_ports_and_interfaces() -> None:
    s = CaptureSettings(
        service_cidr="10.96.0.0/12,fd00:10:96::/112",
        service_exclude_cidr=("10.96.0.1/32", "fd00::1/128"),
        outbound_ports=(8443,),
        outbound_exclude_ports=(9000,),
        exclude_interfaces=("eth1",),
        dns_capture=False,
        ipv6=True,
    )
    v4, v6 = render_iptables(s)
    assert v6 is not None
    out4 = chain_rules(v4, "nat", "VMAGENT_OUTPUT")
    assert out4[:4] == [
        "-A VMAGENT_OUTPUT -o eth1 -j RETURN",
        "-A VMAGENT_OUTPUT -p tcp --dport 9000 -j RETURN",
        "-A VMAGENT_OUTPUT -p udp --dport 9000 -j RETURN",
        "-A VMAGENT_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    ]
    assert out4[-4:] == [
        "-A VMAGENT_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A VMAGENT_OUTPUT -d 10.96.0.1/32 -j RETURN",
        "-A VMAGENT_OUTPUT -p tcp --dport 8443 -j VMAGENT_REDIRECT",
        "-A VMAGENT_OUTPUT -d 10.96.0.0/12 -j VMAGENT_REDIRECT",
    ]
    assert chain_rules(v4, "nat", "VMAGENT_INBOUND")[0] == "-A VMAGENT_INBOUND -i eth1 -j RETURN"
    out6 = chain_rules(v6, "nat", "VMAGENT_OUTPUT")
    assert "-A VMAGENT_OUTPUT -o lo -s ::6/128 -j RETURN" in out6
    assert out6[-4:] == [
        "-A VMAGENT_OUTPUT -d ::1/128 -j RETURN",
        "-A VMAGENT_OUTPUT -d fd00::1/128 -j RETURN",
        "-A VMAGENT_OUTPUT -p tcp --dport 8443 -j VMAGENT_REDIRECT",
        "-A VMAGENT_OUTPUT -d fd00:10:96::/112 -j VMAGENT_REDIRECT",
    ]
    assert "10.96" not in v6
    assert "fd00" not in v4


def test_ipv6_dns_servers_only_in_the_v6_ruleset() -> None:
    v4, v6 = render_iptables(CaptureSettings(ipv6=True, dns_servers_v6=("fd00::53",)))
    assert v6 is not None
    assert "-A VMAGENT_OUTPUT_DNS -p udp --dport 53 -d fd00::53/128 -j REDIRECT --to-ports 15053" in v6
    assert "VMAGENT_OUTPUT -j VMAGENT_OUTPUT_DNS" not in v4  # no v4 resolver: no v4 jump (as Istio)
    assert "-A PREROUTING -j VMAGENT_INBOUND" in v6
    assert "-A PREROUTING -j VMAGENT_INBOUND" not in v4


def test_loopback_in_service_cidr_keeps_app_to_self_traffic_captured() -> None:
    v4, _ = render_iptables(CaptureSettings(service_cidr="127.0.0.0/8", dns_capture=False))
    assert "! --uid-owner" not in v4
    assert "! --gid-owner" not in v4


def test_nft_default_vm() -> None:
    text = render_nft(default_vm())
    chains = {
        block.split(" {", 1)[0].strip(): [line.strip() for line in block.split("\n")[1:] if line.strip()]
        for block in text.split("\tchain ")[1:]
    }
    assert chains["VMAGENT_OUTPUT"] == [
        'oifname "lo" ip saddr 127.0.0.6 return',
        'oifname "lo" ip daddr != 127.0.0.1 tcp dport != { 53, 15008 } meta skuid 1337 jump VMAGENT_IN_REDIRECT',
        'oifname "lo" tcp dport != 53 meta skuid != 1337 return',
        "meta skuid 1337 return",
        'oifname "lo" ip daddr != 127.0.0.1 tcp dport != 15008 meta skgid 1337 jump VMAGENT_IN_REDIRECT',
        'oifname "lo" tcp dport != 53 meta skgid != 1337 return',
        "meta skgid 1337 return",
        "jump VMAGENT_OUTPUT_DNS",
        "ip daddr 127.0.0.1 return",
        "jump VMAGENT_REDIRECT",
        "}",
    ]
    assert chains["VMAGENT_OUTPUT_DNS"][:2] == [
        "ip daddr 127.0.0.53 tcp dport 53 redirect to :15053",
        "ip daddr 127.0.0.53 udp dport 53 redirect to :15053",
    ]
    assert chains["VMAGENT_INBOUND"][1] == (
        "tcp dport { 22, 15000, 15001, 15004, 15006, 15020, 15021, 15053, 15090 } return"
    )
    # IPv6 off: nothing of ours may touch IPv6 packets.
    for base in ("nat_prerouting", "nat_output", "raw_output", "raw_prerouting"):
        assert chains[base][1].startswith("meta nfproto ipv4 "), base
    assert "ct zone set 1 return" in chains["VMAGENT_RAW_INBOUND"][0]
    assert text.startswith("table inet vm_agent {\n")
    assert text.endswith("}\n")


def test_nft_ipv6_rules_have_v6_addresses() -> None:
    text = render_nft(CaptureSettings(ipv6=True, dns_servers_v6=("fd00::53",)))
    assert 'oifname "lo" ip6 saddr ::6 return' in text
    assert "ip6 daddr fd00::53 udp dport 53 redirect to :15053" in text
    assert "meta nfproto ipv4" not in text


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"local_exclude_ports": (70000,)}, "local_exclude_ports: 70000"),
        ({"inbound_ports": "80,http"}, "inbound_ports (ISTIO_INBOUND_PORTS): 'http'"),
        ({"service_exclude_cidr": ("10.0.0.0/33",)}, "service_exclude_cidr"),
        ({"exclude_interfaces": ("eth0 -j ACCEPT",)}, "not an interface name"),
        ({"dns_servers_v4": ("fd00::1",)}, "dns_servers_v4: 'fd00::1' is not an IPv4"),
        ({"dns_servers_v6": ("1.2.3.4; flush ruleset",)}, "dns_servers_v6"),
        ({"proxy_uid": -1}, "proxy_uid"),
    ],
)
def test_bad_settings_are_rejected_with_the_setting_named(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(CaptureSettingsError) as err:
        render(CaptureSettings(**kwargs), "nft")  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="'pf' is not one of iptables, nft"):
        render(CaptureSettings(), "pf")


def test_settings_from_istioctl_cluster_env() -> None:
    text = (FIXTURES / "ipv4" / "cluster.env").read_text()
    env = {k: v for k, _, v in (shlex.split(line)[0].partition("=") for line in text.splitlines() if "=" in line)}
    s = settings_from_env(env, ["10.0.0.2", "fd00::2"])
    assert s.inbound_ports == "*"
    assert s.service_cidr == "*"
    assert s.local_exclude_ports == (22, 15090, 15021, 15020)
    assert s.dns_capture
    assert not s.capture_all_dns
    assert s.dns_servers_v4 == ("10.0.0.2",)
    assert s.dns_servers_v6 == ("fd00::2",)
    assert (s.proxy_uid, s.proxy_gid) == (1337, 1337)


def test_settings_from_env_errors_name_the_key() -> None:
    with pytest.raises(CaptureSettingsError, match="ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE: 'x'"):
        settings_from_env({"ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "9000,x"})
    with pytest.raises(CaptureSettingsError, match="CAPTURE_ALL_DNS: 'maybe' is not a boolean"):
        settings_from_env({"CAPTURE_ALL_DNS": "maybe"})
    with pytest.raises(CaptureSettingsError, match=r"resolv\.conf nameserver: 'dns\.example'"):
        settings_from_env({}, ["dns.example"])
    s = settings_from_env({"PROXY_UID": "998"})
    assert (s.proxy_uid, s.proxy_gid) == (998, 998)  # GID defaults to the UID's number, as istio-iptables


SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:VMAGENT_INBOUND - [0:0]
:VMAGENT_OLD - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p tcp -j VMAGENT_INBOUND
-A OUTPUT -m comment --comment "operator's -j VMAGENT_ note" -j RETURN
-A OUTPUT -p tcp -m tcp --dport 1 -j VMAGENT_OLD
-A VMAGENT_INBOUND -p tcp -m tcp --dport 22 -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""


def test_parse_save_finds_only_our_chains_and_jumps() -> None:
    tables = parse_iptables_save(SAVED)
    assert list(tables) == ["nat"]
    assert tables["nat"].chains == ["VMAGENT_INBOUND", "VMAGENT_OLD"]
    assert tables["nat"].jumps == [
        "-A PREROUTING -p tcp -j VMAGENT_INBOUND",
        "-A OUTPUT -p tcp -m tcp --dport 1 -j VMAGENT_OLD",
    ]


def test_reconcile_replaces_jumps_and_drops_stale_chains() -> None:
    s = CaptureSettings(dns_capture=False)
    text = _reconcile_text(parse_iptables_save(SAVED), iptables_tables(s, 4))
    lines = text.splitlines()
    assert "-D PREROUTING -p tcp -j VMAGENT_INBOUND" in lines
    assert "-D OUTPUT -p tcp -m tcp --dport 1 -j VMAGENT_OLD" in lines
    assert lines.index(":VMAGENT_OLD - [0:0]") < lines.index("-X VMAGENT_OLD")
    assert lines.index("-X VMAGENT_OLD") < lines.index("-A PREROUTING -p tcp -j VMAGENT_INBOUND")
    assert not any("DOCKER" in line or "comment" in line for line in lines)
    assert lines.count("-A PREROUTING -p tcp -j VMAGENT_INBOUND") == 1


def test_reconcile_to_nothing_is_a_cleanup() -> None:
    text = _reconcile_text(parse_iptables_save(SAVED), {})
    assert [line for line in text.splitlines() if line.startswith("-A")] == []
    assert "-X VMAGENT_INBOUND" in text
    assert "-X VMAGENT_OLD" in text
    assert _reconcile_text({}, {}) == ""


def test_custom_ip_tables_turns_capture_off() -> None:
    assert capture_enabled({})
    assert capture_enabled({"ISTIO_CUSTOM_IP_TABLES": "false"})
    assert not capture_enabled({"ISTIO_CUSTOM_IP_TABLES": "true"})


def test_tproxy_mode_falls_back_to_redirect_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vm_agent.netfilter"):
        s = settings_from_env({"ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY"})
    assert "ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY is not supported" in caplog.text
    assert "-j VMAGENT_IN_REDIRECT" in render(s, "iptables")
