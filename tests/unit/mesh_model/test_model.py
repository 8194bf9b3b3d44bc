"""Parsing and validation of mesh manifests: every problem names file, object and field."""

from __future__ import annotations

import pytest
import yaml

from vm_agent.mesh.model import (
    ManifestErrors,
    MeshSnapshot,
    Namespace,
    Service,
    ServiceAccount,
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    key,
    parse_documents,
    to_manifest,
)

GOOD = """
apiVersion: v1
kind: Namespace
metadata: {name: vm-ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: vm-sa, namespace: vm-ns}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: vm-app, namespace: vm-ns}
spec:
  metadata:
    labels: {app: vm-app}
    annotations: {team: blue}
  template:
    serviceAccount: vm-sa
    ports: {http: 8080}
  probe:
    initialDelaySeconds: 1
    periodSeconds: 2
    httpGet: {path: /ready, port: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: vm-app, namespace: vm-ns}
spec:
  selector: {app: vm-app}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ext-api, namespace: vm-ns}
spec:
  hosts: [api.example.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: tls}]
---
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadEntry
metadata:
  name: vm-app-127.0.0.2
  namespace: vm-ns
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec:
  address: 127.0.0.2
  ports: {http: 8080}
  labels: {app: vm-app}
status:
  conditions:
  - {type: Healthy, status: "True", lastProbeTime: "2026-01-01T00:00:00Z", lastTransitionTime: "2026-01-01T00:00:00Z"}
"""


def _errors(text: str, source: str) -> list[str]:
    with pytest.raises(ManifestErrors) as ei:
        parse_documents(text, source)
    return [str(e) for e in ei.value.errors]


def test_multi_document_parses_every_kind() -> None:
    objs = parse_documents(GOOD, "good.yaml")
    assert [type(o) for o in objs] == [Namespace, ServiceAccount, WorkloadGroup, Service, ServiceEntry, WorkloadEntry]
    assert key(objs[0]) == ("Namespace", "", "vm-ns")
    wg = objs[2]
    assert isinstance(wg, WorkloadGroup)
    assert wg.group_labels == {"app": "vm-app"}
    assert wg.template.ports == {"http": 8080}
    assert wg.template.service_account == "vm-sa"
    assert wg.probe is not None
    assert wg.probe["httpGet"]["port"] == 8080
    svc = objs[3]
    assert isinstance(svc, Service)
    assert svc.ports[0].target_port == 8080
    assert svc.ports[0].protocol == "TCP"
    assert not svc.headless
    se = objs[4]
    assert isinstance(se, ServiceEntry)
    assert se.ports[0].protocol == "TLS"
    assert se.addresses == ()
    we = objs[5]
    assert isinstance(we, WorkloadEntry)
    assert we.health_checked
    cond = we.condition("Healthy")
    assert cond is not None
    assert cond.status == "True"
    assert we.spec.service_account == "default"


def test_round_trip_through_manifest() -> None:
    objs = parse_documents(GOOD, "good.yaml")
    again = parse_documents(yaml.safe_dump_all([to_manifest(o) for o in objs]), "again.yaml")
    assert again == objs
    we = to_manifest(objs[5])
    assert we["status"]["conditions"][0]["type"] == "Healthy"
    assert we["apiVersion"] == "networking.istio.io/v1"


def test_kind_list_and_default_namespace() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ServiceAccount, metadata: {name: a}}\n"
    (sa,) = parse_documents(text, "l.yaml")
    assert key(sa) == ("ServiceAccount", "default", "a")


def test_snapshot_of_kind_sorted() -> None:
    objs = parse_documents(GOOD, "good.yaml")
    snap = MeshSnapshot(1, {key(o): o for o in objs})
    assert [o.meta.name for o in snap.of_kind(Service)] == ["vm-app"]
    assert snap.get(WorkloadGroup, "vm-ns", "vm-app") is objs[2]
    assert snap.get(WorkloadGroup, "vm-ns", "nope") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\n",
            "d.yaml: Deployment default/d: kind: unsupported kind",
        ),
        ("apiVersion: v1\nmetadata: {name: x}\n", "d.yaml: document 1: kind: required field is missing"),
        ("- a\n- b\n", "d.yaml: document 1: (root): expected a map"),
        (
            "apiVersion: v2\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n",
            "Service default/s: apiVersion: expected one of v1, got string 'v2'",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: S_1}\nspec: {ports: [{port: 80}]}\n",
            "Service default/S_1: metadata.name: expected a DNS-1123 label",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: n}\nspec: {ports: [{port: 80}]}\n",
            "Service n/?: metadata.name: required field is missing",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {ports: [{port: 70000}]}\n",
            "Service n/s: spec.ports[0].port: out of range, expected 1-65535, got 70000",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 81}]}\n",
            "spec.ports[0].name: required field is missing",
        ),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {}\n", "spec.ports: required field is missing"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: nope, ports: [{port: 80}]}\n",
            "spec.clusterIP: expected an IP address",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {version: 1}}\nspec: {ports: [{port: 80}]}\n",
            "metadata.labels.version: expected a string (quote it in YAML), got int 1",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n",
            "spec.ports[0].protocol: expected one of TCP, UDP, SCTP, got 'ICMP'",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g, namespace: n}\n"
            "spec: {template: {}, probe: {periodSeconds: 2}}\n",
            "WorkloadGroup n/g: spec.probe: expected exactly one of httpGet, tcpSocket, exec, grpc, got none",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g, namespace: n}\n"
            "spec: {template: {}, probe: {httpGet: {port: 1}, tcpSocket: {port: 2}}}\n",
            "spec.probe: expected exactly one of httpGet, tcpSocket, exec, grpc, got httpGet, tcpSocket",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {template: {}, probe: {httpGet: {path: /}}}\n",
            "spec.probe.httpGet.port: required field is missing",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {template: {}, probe: {exec: {command: []}}}\n",
            "spec.probe.exec.command: expected at least one element",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {probe: {grpc: {port: 1}}}\n",
            "WorkloadGroup default/g: spec.template: required field is missing",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {template: {ports: {http: '80'}}}\n",
            "spec.template.ports.http: expected a port number 1-65535, got string '80'",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec: {template: {serviceAcount: x}}\n",
            "spec.template.serviceAcount: unknown field",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: e}\nspec: {ports: {http: 80}}\n",
            "WorkloadEntry default/e: spec.address: required field is missing",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: e}\nspec: {address: 1.2.3.4, weight: -1}\n",
            "spec.weight: out of range",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: e}\nspec: {address: 1.2.3.4}\n"
            "status: {conditions: [{type: Healthy, status: maybe}]}\n",
            'status.conditions[0].status: expected "True", "False" or "Unknown", got \'maybe\'',
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {ports: [{number: 80, name: http, protocol: HTTP}]}\n",
            "ServiceEntry default/se: spec.hosts: required field is missing",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a.com], ports: [{number: 80, name: http, protocol: FTP}]}\n",
            "spec.ports[0].protocol: unrecognized protocol",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a.com], ports: [{number: 80, protocol: HTTP}]}\n",
            "spec.ports[0].name: required field is missing",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a.com], addresses: [300.1.1.1]}\n",
            "spec.addresses[0]: expected an IP address or CIDR",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: ['*.a.com'], resolution: DNS}\n",
            "spec.hosts[0]: resolution DNS without endpoints needs concrete hosts",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a.com], resolution: MAGIC}\n",
            "spec.resolution: expected one of NONE, STATIC, DNS, DNS_ROUND_ROBIN, got 'MAGIC'",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a.com], resolution: STATIC,"
            " workloadSelector: {labels: {app: x}}, endpoints: [{address: 1.1.1.1}]}\n",
            "spec.workloadSelector: workloadSelector and endpoints are mutually exclusive",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec: {hosts: [a.com], resolution: STATIC,"
            " ports: [{number: 80, name: http, protocol: HTTP}], endpoints: [{address: 1.1.1.1, ports: {grpc: 90}}]}\n",
            "spec.endpoints[0].ports.grpc: names no port of this ServiceEntry",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n",
            "Namespace a: metadata.namespace: Namespace is cluster-scoped",
        ),
        ("a: [\n", "d.yaml: (YAML): line 2 column 1: not valid YAML"),
    ],
)
def test_bad_input_names_file_object_field(text: str, expected: str) -> None:
    errs = _errors(text, "d.yaml")
    assert any(expected in e for e in errs), errs


def test_all_problems_collected_across_documents() -> None:
    text = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 1, targetPort: 99999}]}\n---\n"
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ok}\n---\n"
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ok}\n"
    )
    with pytest.raises(ManifestErrors) as ei:
        parse_documents(text, "m.yaml")
    errs = ei.value.errors
    assert [(e.obj, e.field) for e in errs] == [
        ("Service default/a", "spec.ports[0].port"),
        ("Service default/b", "spec.ports[0].targetPort"),
        ("ServiceAccount default/ok", "metadata.name"),
    ]
    assert all(e.file == "m.yaml" for e in errs)
    assert str(ei.value).count("\n") == 2


def test_export_to_validated() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: n}\n"
        "spec: {hosts: [a.com], exportTo: ['~', Bad_NS], ports: [{number: 80, name: http, protocol: HTTP}]}\n"
    )
    with pytest.raises(ManifestErrors) as ei:
        parse_documents(text, "x.yaml")
    msgs = [str(e) for e in ei.value.errors]
    assert 'x.yaml: ServiceEntry n/se: spec.exportTo[1]: expected ".", "*", "~" or a namespace name' in msgs[0]
    good = parse_documents(text.replace("'~', Bad_NS", "'.', other"), "x.yaml")[0]
    assert isinstance(good, ServiceEntry)
    assert good.export_to == (".", "other")
    assert to_manifest(good)["spec"]["exportTo"] == [".", "other"]
