"""The proxy's routing and classification rules, and its socket-path checks."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from grpclib.const import Status

from vm_agent.proto import HEALTH_INFO_TYPE_URL, NAME_TABLE_TYPE_URL, PROXY_CONFIG_TYPE_URL
from vm_agent.sockets import SOCKET_MODE, listen_unix
from vm_agent.xds.proxy import classify, forwardable


def _prepare_socket_path(path: Path) -> None:
    listen_unix(path, mode=SOCKET_MODE, what="xDS proxy").close()


@pytest.mark.parametrize(
    ("type_url", "expected"),
    [
        ("type.googleapis.com/envoy.config.cluster.v3.Cluster", True),
        ("type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", True),
        ("type.googleapis.com/istio.workload.Workload", True),
        (NAME_TABLE_TYPE_URL, False),
        (PROXY_CONFIG_TYPE_URL, False),
        (HEALTH_INFO_TYPE_URL, False),
        ("type.googleapis.com/envoyx.Thing", False),
        ("envoy.config.cluster.v3.Cluster", False),
        ("", False),
    ],
)
def test_only_envoy_types_and_workload_reach_envoy(type_url: str, expected: bool) -> None:
    assert forwardable(type_url) is expected


def test_disconnect_classes() -> None:
    assert classify(Status.OK) == "graceful"
    for code in (Status.CANCELLED, Status.DEADLINE_EXCEEDED, Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED):
        assert classify(code) == "expected"
    # Delta istiod answers "not ready" with Unknown (§18 P9): worth a warning, as in Istio.
    for code in (Status.UNKNOWN, Status.PERMISSION_DENIED, Status.UNAUTHENTICATED):
        assert classify(code) == "unexpected"


def test_socket_path_parent_created_0750(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "istio" / "proxy" / "XDS"
    _prepare_socket_path(path)
    assert path.parent.is_dir()
    assert path.parent.stat().st_mode & 0o777 == 0o750 & ~_umask()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "XDS"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
        client.connect(str(path))
    with listen_unix(path, mode=SOCKET_MODE, what="xDS proxy"), socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # a listening socket now sits where the stale one was
        assert stat.S_IMODE(path.stat().st_mode) == SOCKET_MODE


def test_refuses_to_delete_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "XDS"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="exists and is not a socket"):
        _prepare_socket_path(path)
    assert path.read_text() == "not a socket"


def test_too_long_socket_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "XDS"
    with pytest.raises(ValueError, match=r"at most 107"):
        _prepare_socket_path(path)


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current


def test_unusable_socket_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"xDS proxy socket folder .*/file cannot be created"):
        _prepare_socket_path(tmp_path / "file" / "XDS")
