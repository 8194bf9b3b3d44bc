"""Envoy's raw istiocustom series → Istio's metrics on the merged /stats/prometheus."""

from __future__ import annotations

from vm_agent.telemetry.filters import SEPARATOR
from vm_agent.telemetry.metrics import LABELS, TCP_LABELS, IstioMetrics, LocalWorkload
from vm_agent.telemetry.peer import Workload, header_value

LOCAL = LocalWorkload(
    workload="client",
    namespace="demo",
    canonical_name="client",
    canonical_revision="latest",
    app="client",
    cluster="Kubernetes",
    istio_version="1.28.0",
)
SERVER = Workload(namespace="demo", workload="hello", canonical_name="hello", canonical_revision="v1", app="hello")


def raw(*facts: str) -> str:
    return SEPARATOR.join(["1", *facts]).replace('"', '\\"')


def outbound(instance: str, code: str = "200") -> str:
    peer = header_value(Workload(**{**SERVER.__dict__, "instance": instance}))
    return raw(
        "source",
        "http",
        peer,
        "spiffe://cluster.local/ns/demo/sa/hello",
        "spiffe://cluster.local/ns/demo/sa/client",
        "hello;demo;hello;v1;Kubernetes",
        "outbound|80||hello.demo.svc.cluster.local",
        "80",
        '[{"host":"hello.demo.svc.cluster.local","name":"hello","namespace":"demo"}]',
        "hello.demo:80",
        "",
        code,
        "",
        "-",
    )


ENVOY = "\n".join(
    [
        "# TYPE envoy_cluster_upstream_cx_total counter",
        'envoy_cluster_upstream_cx_total{cluster_name="xds-grpc"} 3',
        "# TYPE envoy_istiocustom_istio_requests_total counter",
        f'envoy_istiocustom_istio_requests_total{{raw="{outbound("pod-a")}"}} 2',
        f'envoy_istiocustom_istio_requests_total{{raw="{outbound("pod-b")}"}} 3',
        f'envoy_istiocustom_istio_requests_total{{raw="{outbound("pod-b", "503")}"}} 1',
        "# TYPE envoy_istiocustom_istio_request_duration_milliseconds histogram",
        f'envoy_istiocustom_istio_request_duration_milliseconds_bucket{{raw="{outbound("pod-a")}",le="0.5"}} 1',
        f'envoy_istiocustom_istio_request_duration_milliseconds_bucket{{raw="{outbound("pod-a")}",le="+Inf"}} 2',
        f'envoy_istiocustom_istio_request_duration_milliseconds_sum{{raw="{outbound("pod-a")}"}} 3.5',
        f'envoy_istiocustom_istio_request_duration_milliseconds_count{{raw="{outbound("pod-a")}"}} 2',
        f'envoy_istiocustom_istio_request_duration_milliseconds_bucket{{raw="{outbound("pod-b")}",le="0.5"}} 0',
        f'envoy_istiocustom_istio_request_duration_milliseconds_bucket{{raw="{outbound("pod-b")}",le="+Inf"}} 3',
        f'envoy_istiocustom_istio_request_duration_milliseconds_sum{{raw="{outbound("pod-b")}"}} 9',
        f'envoy_istiocustom_istio_request_duration_milliseconds_count{{raw="{outbound("pod-b")}"}} 3',
        "# TYPE envoy_istiocustom_istio_tcp_connections_opened_total counter",
        'envoy_istiocustom_istio_tcp_connections_opened_total{raw="'
        + raw("destination", "tcp", "", "spiffe://cluster.local/ns/web/sa/web", "spiffe://x/ns/demo/sa/client", "")
        + SEPARATOR * 8
        + '"} 4',
        "envoy_server_live 1",
    ]
)


def test_pods_of_one_workload_add_up_under_istios_labels() -> None:
    out = IstioMetrics(LOCAL).render(ENVOY)
    lines = out.splitlines()
    assert 'envoy_cluster_upstream_cx_total{cluster_name="xds-grpc"} 3' in lines
    assert "envoy_server_live 1" in lines
    assert not any("istiocustom" in line for line in lines)
    ok = [line for line in lines if line.startswith("istio_requests_total{") and 'response_code="200"' in line]
    assert len(ok) == 1 and ok[0].endswith(" 5")  # pod-a 2 + pod-b 3: Istio's labels carry no pod name
    assert 'destination_workload="hello"' in ok[0]
    assert 'destination_version="unknown"' in ok[0]  # the peer sent no version
    assert 'source_version=""' in ok[0]  # the local side stays as its metadata says
    assert 'connection_security_policy="unknown"' in ok[0]
    assert 'destination_service_name="hello"' in ok[0]
    labels = ok[0][ok[0].index("{") + 1 : ok[0].rindex("}")]
    assert [part.split("=", 1)[0] for part in labels.split('",')] == list(LABELS)
    assert any(line.startswith("istio_requests_total{") and 'response_code="503"' in line for line in lines)
    hist = [line for line in lines if line.startswith("istio_request_duration_milliseconds_")]
    assert any(line.endswith(" 12.5") for line in hist if "_sum{" in line)
    assert any(line.endswith(" 5") for line in hist if "_count{" in line)
    assert any('le="+Inf"} 5' in line for line in hist)
    assert 'istio_build{component="proxy",tag="1.28.0"} 1' in lines


def test_tcp_inbound_peer_comes_from_the_certificate() -> None:
    out = IstioMetrics(LOCAL).render(ENVOY)
    (tcp,) = [line for line in out.splitlines() if line.startswith("istio_tcp_connections_opened_total{")]
    assert 'source_principal="spiffe://cluster.local/ns/web/sa/web"' in tcp
    assert 'source_workload_namespace="web"' in tcp
    assert 'source_workload="unknown"' in tcp
    assert 'source_canonical_revision="latest"' in tcp
    assert 'connection_security_policy="mutual_tls"' in tcp
    assert 'destination_service="client"' in tcp  # no service metadata: the canonical name, as istio-proxy does
    labels = tcp[tcp.index("{") + 1 : tcp.rindex("}")]
    assert [part.split("=", 1)[0] for part in labels.split('",')] == list(TCP_LABELS)


def test_text_without_istio_series_is_untouched() -> None:
    text = "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n"
    assert IstioMetrics(LOCAL).render(text) is text


def test_grpc_requests_carry_their_status() -> None:
    from vm_agent.telemetry.metrics import Raw, istio_labels

    base = dict(reporter="destination", protocol="http", response_code="200", response_flags="-")
    grpc = istio_labels(Raw(**base, content_type="application/grpc+proto", grpc_status="14"), LOCAL)
    assert (grpc["request_protocol"], grpc["grpc_response_status"]) == ("grpc", "14")
    web = istio_labels(Raw(**base, content_type="application/grpc-web", grpc_status="14"), LOCAL)
    assert (web["request_protocol"], web["grpc_response_status"]) == ("http", "")


def test_requests_total_is_the_duration_histograms_count_when_envoy_has_no_counter() -> None:
    # What the agent configures today: Envoy keeps the histograms only (one tag format per request less).
    without_counter = "\n".join(line for line in ENVOY.splitlines() if "istio_requests_total" not in line)
    lines = IstioMetrics(LOCAL).render(without_counter).splitlines()
    totals = [line for line in lines if line.startswith("istio_requests_total{")]
    assert len(totals) == 1 and totals[0].endswith(" 5")  # pod-a 2 + pod-b 3, from the _count lines
    assert "# TYPE istio_requests_total counter" in lines
    # An Envoy an older agent configured still counts requests itself: its figures win, none are added.
    both = IstioMetrics(LOCAL).render(ENVOY).splitlines()
    assert sorted(line.rsplit(" ", 1)[1] for line in both if line.startswith("istio_requests_total{")) == ["1", "5"]


def test_raw_version_2_takes_the_services_from_cds_by_cluster_name() -> None:
    # Version 2 tags leave the services slot empty; the agent knows them from CDS (ClusterServices).
    v1 = outbound("pod-a")
    v2 = v1.replace(
        '[{\\"host\\":\\"hello.demo.svc.cluster.local\\",\\"name\\":\\"hello\\",\\"namespace\\":\\"demo\\"}]', ""
    )
    v2 = "2" + v2[1:]
    assert v2 != v1 and "hello.demo.svc.cluster.local" not in v2.split(SEPARATOR)[9]
    text = "\n".join(
        [
            "# TYPE envoy_istiocustom_istio_request_duration_milliseconds histogram",
            f'envoy_istiocustom_istio_request_duration_milliseconds_count{{raw="{v2}"}} 4',
            f'envoy_istiocustom_istio_request_duration_milliseconds_sum{{raw="{v2}"}} 4',
        ]
    )
    asked: list[str] = []

    def services(cluster: str) -> str:
        asked.append(cluster)
        return '[{"host":"hello.demo.svc.cluster.local","name":"hello","namespace":"demo"}]'

    lines = IstioMetrics(LOCAL, services=services).render(text).splitlines()
    total = next(line for line in lines if line.startswith("istio_requests_total{"))
    assert 'destination_service="hello.demo.svc.cluster.local"' in total
    assert 'destination_service_name="hello"' in total and 'destination_service_namespace="demo"' in total
    assert total.endswith(" 4")
    assert set(asked) == {"outbound|80||hello.demo.svc.cluster.local"}
    # A cluster CDS never named: the authority is all there is, as for istio-proxy without cluster metadata.
    unknown = IstioMetrics(LOCAL, services=lambda _: "").render(text).splitlines()
    total = next(line for line in unknown if line.startswith("istio_requests_total{"))
    assert 'destination_service="hello.demo:80"' in total


def test_inbound_own_principal_is_the_agents_spiffe_id_when_the_caller_showed_one() -> None:
    # The inbound raw tag leaves our own SAN out; a caller with a certificate means mutual TLS on a mesh chain.
    me = "spiffe://cluster.local/ns/demo/sa/client"
    local = LocalWorkload(**{**LOCAL.__dict__, "principal": me})

    def line(peer_san: str) -> str:
        tag = raw("destination", "tcp", "", peer_san, "", "") + SEPARATOR * 8
        text = f'# TYPE envoy_istiocustom_istio_tcp_connections_opened_total counter\nenvoy_istiocustom_istio_tcp_connections_opened_total{{raw="{tag}"}} 1'
        (out,) = [x for x in IstioMetrics(local).render(text).splitlines() if x.startswith("istio_tcp_")]
        return out

    mtls = line("spiffe://cluster.local/ns/web/sa/web")
    assert f'destination_principal="{me}"' in mtls and 'connection_security_policy="mutual_tls"' in mtls
    plain = line("")
    assert 'destination_principal="unknown"' in plain and 'connection_security_policy="none"' in plain


def v3(*, reporter: str, response: tuple[str, str, str], cluster: str, endpoint: str, request: list[str]) -> str:
    """A version 3 tag (filters._raw): response facts, cluster, endpoint, two empty slots, the request's facts."""
    return SEPARATOR.join(["3", reporter, "http", *response, cluster, endpoint, "", "", *request])


def test_raw_version_3_inbound_reads_the_captured_request_facts() -> None:
    me = "spiffe://cluster.local/ns/demo/sa/client"
    local = LocalWorkload(**{**LOCAL.__dict__, "principal": me})
    caller = header_value(Workload(namespace="web", workload="web-v1", app="web", version="v1", cluster="west"))
    tag = v3(
        reporter="destination",
        response=("200", "", "-"),
        cluster="inbound|8080||",
        endpoint="",
        request=["spiffe://cluster.local/ns/web/sa/web", "", "", "text/plain", caller],
    )
    text = (
        "# TYPE envoy_istiocustom_istio_request_duration_milliseconds histogram\n"
        f'envoy_istiocustom_istio_request_duration_milliseconds_count{{raw="{tag}"}} 7\n'
    )
    total = next(x for x in IstioMetrics(local).render(text).splitlines() if x.startswith("istio_requests_total{"))
    for label in (
        'reporter="destination"',
        'source_workload="web-v1"',
        'source_version="v1"',
        'source_cluster="west"',
        'source_principal="spiffe://cluster.local/ns/web/sa/web"',
        f'destination_principal="{me}"',
        'request_protocol="http"',
        'response_code="200"',
        'connection_security_policy="mutual_tls"',
    ):
        assert label in total, label
    assert total.endswith(" 7")


def test_raw_version_3_without_the_capture_still_counts() -> None:
    # A request Envoy answered before the capture filter ran (a malformed one) has no request facts in its tag:
    # the filter state prints as one empty field.
    tag = v3(reporter="destination", response=("400", "", "DPE"), cluster="inbound|8080||", endpoint="", request=[""])
    text = (
        "# TYPE envoy_istiocustom_istio_request_duration_milliseconds histogram\n"
        f'envoy_istiocustom_istio_request_duration_milliseconds_count{{raw="{tag}"}} 1\n'
    )
    total = next(x for x in IstioMetrics(LOCAL).render(text).splitlines() if x.startswith("istio_requests_total{"))
    assert 'response_code="400"' in total and 'response_flags="DPE"' in total
    assert 'source_principal="unknown"' in total and 'connection_security_policy="none"' in total


def test_outbound_own_principal_is_the_agents_spiffe_id_on_mutual_tls() -> None:
    me = "spiffe://cluster.local/ns/demo/sa/client"
    local = LocalWorkload(**{**LOCAL.__dict__, "principal": me})
    peer = header_value(SERVER)

    def total(peer_san: str) -> str:
        tag = v3(
            reporter="source",
            response=("200", "", "-"),
            cluster="outbound|80||hello.demo.svc.cluster.local",
            endpoint="hello;demo;hello;v1;Kubernetes",
            request=[peer_san, "default", "hello.demo:80", "", peer],
        )
        text = (
            "# TYPE envoy_istiocustom_istio_request_duration_milliseconds histogram\n"
            f'envoy_istiocustom_istio_request_duration_milliseconds_count{{raw="{tag}"}} 1\n'
        )
        return next(x for x in IstioMetrics(local).render(text).splitlines() if x.startswith("istio_requests_total{"))

    mtls = total("spiffe://cluster.local/ns/demo/sa/hello")
    assert f'source_principal="{me}"' in mtls
    assert 'destination_principal="spiffe://cluster.local/ns/demo/sa/hello"' in mtls
    assert 'destination_workload="hello"' in mtls and 'destination_service="hello.demo:80"' in mtls
    plain = total("")
    assert 'source_principal="unknown"' in plain
