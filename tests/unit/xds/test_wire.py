"""The wire peeker agrees with protobuf's own parser, and the requests it builds parse as Envoy's types."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import given
from hypothesis import strategies as st

from vm_agent.xds.wire import Flavour, WireError, build_request, first_resource, peek_request, peek_response

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
text = st.text(max_size=40)


def _cluster_any(name: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(cluster_pb2.Cluster(name=name))
    return packed


@given(version=text, type_url=text, nonce=text, names=st.lists(st.text(max_size=10), max_size=5))
def test_peek_sotw_response_matches_protobuf(version: str, type_url: str, nonce: str, names: list[str]) -> None:
    resp = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=type_url, nonce=nonce, resources=[_cluster_any(n) for n in names]
    )
    head = peek_response(resp.SerializeToString())
    assert (head.type_url, head.nonce, head.version) == (type_url, nonce, version)


@given(version=text, type_url=text, nonce=text, removed=st.lists(text, max_size=3))
def test_peek_delta_response_matches_protobuf(version: str, type_url: str, nonce: str, removed: list[str]) -> None:
    resp = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version,
        type_url=type_url,
        nonce=nonce,
        removed_resources=removed,
        resources=[discovery_pb2.Resource(name="a", version="1", resource=_cluster_any("a"))],
    )
    head = peek_response(resp.SerializeToString())
    assert (head.type_url, head.nonce, head.version) == (type_url, nonce, version)


def test_peek_skips_unknown_fields_of_every_wire_type() -> None:
    known = discovery_pb2.DiscoveryResponse(type_url=CDS, nonce="n1", version_info="v1").SerializeToString()
    # field 99 varint, field 98 fixed64, field 97 fixed32, field 96 bytes, field 95 group containing a varint
    unknown = bytes([0x98, 0x06, 0x05, 0x91, 0x06]) + b"\x00" * 8 + bytes([0x8D, 0x06]) + b"\x00" * 4
    unknown += bytes([0x82, 0x06, 0x03]) + b"abc" + bytes([0xFB, 0x05, 0x08, 0x01, 0xFC, 0x05])
    head = peek_response(unknown + known + unknown)
    assert (head.type_url, head.nonce, head.version) == (CDS, "n1", "v1")


def test_last_occurrence_wins_like_protobuf() -> None:
    first = discovery_pb2.DiscoveryResponse(nonce="old").SerializeToString()
    second = discovery_pb2.DiscoveryResponse(nonce="new").SerializeToString()
    merged = discovery_pb2.DiscoveryResponse.FromString(first + second)
    assert peek_response(first + second).nonce == merged.nonce == "new"


@pytest.mark.parametrize(
    "bad",
    [b"\x22\x05ab", b"\x22", b"\x80", b"\x00\x01", b"\x26", b"\x2b\x08\x01"],
    ids=["short-string", "no-length", "short-varint", "field-zero", "wire-type-6", "open-group"],
)
def test_malformed_bytes_raise_wire_error(bad: bytes) -> None:
    with pytest.raises(WireError):
        peek_response(bad)


@given(type_url=text, nonce=text, message=st.none() | text)
def test_peek_sotw_request(type_url: str, nonce: str, message: str | None) -> None:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names=["x"])
    req.node.id = "sidecar~1.1.1.1~vm.ns~ns.svc.cluster.local"
    if message is not None:
        req.error_detail.code = 13
        req.error_detail.message = message
    head = peek_request(req.SerializeToString(), Flavour.SOTW)
    assert (head.type_url, head.response_nonce, head.error_message) == (type_url, nonce, message)


@given(type_url=text, nonce=text, message=st.none() | text)
def test_peek_delta_request(type_url: str, nonce: str, message: str | None) -> None:
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names_subscribe=["x"])
    req.initial_resource_versions["a"] = "1"
    if message is not None:
        req.error_detail.code = 13
        req.error_detail.message = message
    head = peek_request(req.SerializeToString(), Flavour.DELTA)
    assert (head.type_url, head.response_nonce, head.error_message) == (type_url, nonce, message)


@given(type_url=text, version=text, nonce=text, error=st.none() | st.tuples(st.integers(0, 2**31 - 1), text))
def test_build_sotw_request_parses(type_url: str, version: str, nonce: str, error: tuple[int, str] | None) -> None:
    raw = build_request(Flavour.SOTW, type_url, version_info=version, response_nonce=nonce, error=error)
    req = discovery_pb2.DiscoveryRequest.FromString(raw)
    assert (req.type_url, req.version_info, req.response_nonce) == (type_url, version, nonce)
    assert req.HasField("error_detail") == (error is not None)
    if error is not None:
        assert (req.error_detail.code, req.error_detail.message) == error
    # Byte-identical to protobuf's own encoding, so istiod cannot tell who built it.
    assert raw == req.SerializeToString(deterministic=True)


@given(type_url=text, nonce=text, error=st.none() | st.tuples(st.integers(0, 2**31 - 1), text))
def test_build_delta_request_parses(type_url: str, nonce: str, error: tuple[int, str] | None) -> None:
    raw = build_request(Flavour.DELTA, type_url, version_info="ignored", response_nonce=nonce, error=error)
    req = discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
    assert (req.type_url, req.response_nonce) == (type_url, nonce)
    assert not req.resource_names_subscribe
    assert req.HasField("error_detail") == (error is not None)
    if error is not None:
        assert (req.error_detail.code, req.error_detail.message) == error
    assert raw == req.SerializeToString(deterministic=True)


@given(
    resources=st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=40)), max_size=4),
    delta=st.booleans(),
)
def test_first_resource_matches_protobuf(resources: list[tuple[str, bytes]], delta: bool) -> None:
    anys = [any_pb2.Any(type_url=t, value=v) for t, v in resources]
    if delta:
        message = discovery_pb2.DeltaDiscoveryResponse(
            type_url="t", nonce="n", resources=[discovery_pb2.Resource(name="r", version="1", resource=a) for a in anys]
        ).SerializeToString()
    else:
        message = discovery_pb2.DiscoveryResponse(version_info="1", resources=anys, nonce="n").SerializeToString()
    expected = (resources[0][0], resources[0][1]) if resources else None
    assert first_resource(message, Flavour.DELTA if delta else Flavour.SOTW) == expected


def test_first_resource_of_a_delta_resource_without_payload_is_empty() -> None:
    message = discovery_pb2.DeltaDiscoveryResponse(resources=[discovery_pb2.Resource(name="gone")]).SerializeToString()
    assert first_resource(message, Flavour.DELTA) == ("", b"")
    with pytest.raises(WireError):
        first_resource(b"\x12\x05ab", Flavour.SOTW)
