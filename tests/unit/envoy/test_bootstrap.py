"""The rendered bootstrap and command line pinned against istio-agent.md §6.3 and §7.1."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from vm_agent.envoy import EnvoySettings, NodeInfo, envoy_command, render_bootstrap, write_bootstrap
from vm_agent.envoy.bootstrap import runtime_layer, split_log_level

NODE_ID = "sidecar~10.0.0.7~vm-1.ns1~ns1.svc.cluster.local"
META: dict[str, Any] = {
    "ISTIO_VERSION": "1.28.0",
    "INSTANCE_IPS": "10.0.0.7",
    "ENVOY_STATUS_PORT": 15021,
    "DNS_CAPTURE": "true",
    "LABELS": {"app": "foo"},
    "app": "foo",
    "MESH_ID": "",
    "PROXY_CONFIG": {"drainDuration": "45s"},
}


def settings(tmp: Path = Path("/etc/istio/proxy"), **kw: Any) -> EnvoySettings:
    values: dict[str, Any] = {
        "binary": Path("/usr/local/bin/envoy"),
        "config_dir": tmp,
        "node": NodeInfo(NODE_ID, "foo.ns1", META, {"region": "eu", "zone": "", "sub_zone": "rack1"}),
        "xds_socket": tmp / "XDS",
        "sds_socket": Path("/var/run/secrets/workload-spiffe-uds/socket"),
    }
    values.update(kw)
    return EnvoySettings(**values)


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(i for i in items if i["name"] == name)


def endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    return dict(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"])


def test_node_is_exactly_what_config_built() -> None:
    b = render_bootstrap(settings())
    assert b["node"]["id"] == NODE_ID
    assert b["node"]["cluster"] == "foo.ns1"
    assert b["node"]["metadata"] == META  # verbatim: string bools, empty strings, nested objects
    assert b["node"]["locality"] == {"region": "eu", "sub_zone": "rack1"}  # empty parts left out
    assert "locality" not in render_bootstrap(settings(node=NodeInfo(NODE_ID, "c", {})))["node"]


def test_dynamic_resources_delta_by_default_and_sotw_by_option() -> None:
    dyn = render_bootstrap(settings())["dynamic_resources"]
    for key in ("lds_config", "cds_config"):
        assert dyn[key] == {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    assert dyn["ads_config"] == {
        "api_type": "DELTA_GRPC",
        "set_node_on_first_message_only": True,
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
    }
    assert render_bootstrap(settings(delta_xds=False))["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"


def test_static_clusters() -> None:
    clusters = render_bootstrap(settings(admin_port=15000, status_port=15020))["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == ["prometheus_stats", "agent", "sds-grpc", "xds-grpc"]
    prom, agent = by_name(clusters, "prometheus_stats"), by_name(clusters, "agent")
    assert endpoint(prom)["socket_address"]["port_value"] == 15000
    assert endpoint(agent)["socket_address"] == {"protocol": "TCP", "address": "127.0.0.1", "port_value": 15020}
    assert prom["connect_timeout"] == agent["connect_timeout"] == "0.250s"
    sds, xds = by_name(clusters, "sds-grpc"), by_name(clusters, "xds-grpc")
    assert endpoint(sds) == {"pipe": {"path": "/var/run/secrets/workload-spiffe-uds/socket"}}
    assert endpoint(xds) == {"pipe": {"path": "/etc/istio/proxy/XDS"}}
    for c in (sds, xds):
        assert c["type"] == "STATIC" and c["connect_timeout"] == "1s"
        options = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    assert xds["max_requests_per_connection"] == 1
    assert xds["upstream_connection_options"] == {"tcp_keepalive": {"keepalive_time": 300}}
    thresholds = xds["circuit_breakers"]["thresholds"]
    assert [t["priority"] for t in thresholds] == ["DEFAULT", "HIGH"]
    assert all(t["max_connections"] == t["max_pending_requests"] == t["max_requests"] == 100000 for t in thresholds)


def route(listener: dict[str, Any]) -> tuple[str, str, str]:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    r = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    return hcm["stat_prefix"], r["match"]["prefix"], r["route"]["cluster"]


def test_static_listeners_ipv4() -> None:
    b = render_bootstrap(settings())
    listeners = b["static_resources"]["listeners"]
    prom, ready = by_name(listeners, "0.0.0.0_15090"), by_name(listeners, "0.0.0.0_15021")
    assert prom["address"]["socket_address"]["address"] == "0.0.0.0"
    assert route(prom) == ("stats", "/stats/prometheus", "prometheus_stats")
    assert prom["ignore_global_conn_limit"] is True and prom["bypass_overload_manager"] is True
    assert route(ready) == ("agent", "/healthz/ready", "agent")
    assert ready["address"]["socket_address"]["port_value"] == 15021
    assert b["admin"]["address"]["socket_address"] == {"protocol": "TCP", "address": "127.0.0.1", "port_value": 15000}


def test_ipv6_only_uses_v6_wildcard_and_localhost() -> None:
    s = settings(ipv6_only=True)
    b = render_bootstrap(s)
    addresses = [li["address"]["socket_address"]["address"] for li in b["static_resources"]["listeners"]]
    assert addresses == ["::", "::"]
    assert b["admin"]["address"]["socket_address"]["address"] == "::1"
    assert endpoint(by_name(b["static_resources"]["clusters"], "agent"))["socket_address"]["address"] == "::1"
    v4_status = render_bootstrap(settings(ipv6_only=True, status_host="127.0.0.1"))["static_resources"]["clusters"]
    assert endpoint(by_name(v4_status, "agent"))["socket_address"]["address"] == "127.0.0.1"
    cmd = envoy_command(s, Path("/b.json"))
    assert cmd[cmd.index("--local-address-ip-version") + 1] == "v6"


def test_metrics_localhost_only_binds_15090_to_localhost() -> None:
    listeners = render_bootstrap(settings(metrics_localhost_only=True))["static_resources"]["listeners"]
    prom = by_name(listeners, "127.0.0.1_15090")
    assert prom["address"]["socket_address"]["address"] == "127.0.0.1"
    assert by_name(listeners, "0.0.0.0_15021")  # readiness stays reachable


def test_runtime_layers_and_overrides() -> None:
    b = render_bootstrap(settings(runtime_values={"a.b": "true", "re2.max_program_size.error_level": "", "x": "7"}))
    layers = b["layered_runtime"]["layers"]
    assert layers[1] == {"name": "admin", "admin_layer": {}}
    static = layers[0]["static_layer"]
    assert layers[0]["name"] == "global config"
    assert static["a.b"] is True and static["x"] == "7"
    assert "re2.max_program_size.error_level" not in static
    assert runtime_layer({})["re2.max_program_size.error_level"] == "32768"
    assert runtime_layer({})["envoy.reloadable_features.http_reject_path_with_fragment"] is False


def test_stats_matcher_keeps_what_readiness_and_drain_read() -> None:
    stats = render_bootstrap(settings())["stats_config"]
    assert stats["use_all_default_tags"] is False
    patterns = stats["stats_matcher"]["inclusion_list"]["patterns"]
    prefixes = [p["prefix"] for p in patterns if "prefix" in p]
    assert prefixes[0] == "reporter="
    for needed in ("cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm", "component", "istio"):
        assert needed in prefixes
    assert {"suffix": "rbac.allowed"} in patterns and {"suffix": "shadow_denied"} in patterns
    assert {"safe_regex": {"regex": r"vhost\..*\.route\..*"}} in patterns
    assert {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"} in stats[
        "stats_tags"
    ]


def test_extensions_overload_and_deferred_stats() -> None:
    b = render_bootstrap(settings())
    assert [e["name"] for e in b["bootstrap_extensions"]] == ["envoy.bootstrap.internal_listener"]
    assert b["bootstrap_extensions"][0]["typed_config"]["value"] == {"buffer_size_kb": 64}
    monitor = b["overload_manager"]["resource_monitors"][0]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] == 2147483647
    assert b["deferred_stat_options"] == {"enable_deferred_creation_stats": True}
    assert b["application_log_config"]["log_format"]["text_format"] == (
        "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
    )
    json_log = render_bootstrap(settings(log_as_json=True))["application_log_config"]["log_format"]
    assert json_log["json_format"]["msg"] == "%j" and json_log["json_format"]["level"] == "%l"
    md = settings(node=NodeInfo(NODE_ID, "c", {"METADATA_DISCOVERY": "true"}))
    assert render_bootstrap(md)["bootstrap_extensions"][0]["name"] == "metadata_discovery"
    sotw = settings(node=NodeInfo(NODE_ID, "c", {"METADATA_DISCOVERY": "true"}), delta_xds=False)
    assert len(render_bootstrap(sotw)["bootstrap_extensions"]) == 1  # only with Delta, as Istio


def test_command_line_order_and_flags() -> None:
    s = settings(concurrency=2, drain_duration_s=45.0, log_level="info,misc:error,upstream:debug")
    assert envoy_command(s, Path("/etc/istio/proxy/envoy-rev.json")) == [
        "/usr/local/bin/envoy",
        "-c",
        "/etc/istio/proxy/envoy-rev.json",
        "--drain-time-s",
        "45",
        "--drain-strategy",
        "immediate",
        "--local-address-ip-version",
        "v4",
        "--file-flush-interval-msec",
        "1000",
        "--disable-hot-restart",
        "--allow-unknown-static-fields",
        "-l",
        "info",
        "--component-log-level",
        "misc:error,upstream:debug",
        "--skip-deprecated-logs",
        "--concurrency",
        "2",
    ]
    plain = envoy_command(settings(component_log_level="misc:error"), Path("/b.json"))
    assert plain[plain.index("-l") + 1] == "warning"
    assert plain[plain.index("--component-log-level") + 1] == "misc:error"
    assert "--concurrency" not in plain
    for absent in ("--restart-epoch", "--parent-shutdown-time-s", "--service-cluster", "--service-node"):
        assert absent not in plain


def test_split_log_level_like_pilot_agent() -> None:
    assert split_log_level("debug") == ("debug", None)
    assert split_log_level("info,warning") == ("warning", None)  # last global one wins
    assert split_log_level("a:b,c:d:e,info") == ("info", "a:b")  # too many colons dropped


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"admin_port": 0}, "admin_port"),
        ({"status_port": 70000}, "status_port"),
        ({"log_level": "loud"}, "log_level"),
        ({"node": NodeInfo("not-a-node-id", "c", {})}, "node.id"),
        ({"termination_drain_duration_s": -1}, "drain"),
        ({"restart_backoff_initial_s": 0}, "restart_backoff"),
        ({"restart_backoff_initial_s": 5, "restart_backoff_max_s": 1}, "restart_backoff"),
    ],
)
def test_bad_settings_name_the_field(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        settings(**kw)


def test_write_bootstrap_makes_private_dir_and_valid_json(tmp_path: Path) -> None:
    s = settings(tmp_path / "proxy")
    path = write_bootstrap(s)
    assert path == tmp_path / "proxy" / "envoy-rev.json"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["node"]["id"] == NODE_ID
