"""Every kind of bad input gives exit code 2 and names the file, line and key (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.config.conftest import FixtureFactory


def check(folder: Path, resolv: Path, *extra: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vm_agent",
            "check",
            "--config-dir",
            str(folder),
            "--resolv-conf",
            str(resolv),
            "--json",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "VM_AGENT_SCAN_INTERFACES": "false", **dict(e.split("=", 1) for e in extra)},
        timeout=60,
    )
    doc = json.loads(proc.stdout)
    return proc.returncode, [str(p) for p in doc["problems"]], proc.stdout


@pytest.mark.parametrize("name", ["cluster.env", "mesh.yaml", "hosts", "root-cert.pem", "istio-token"])
def test_missing_file(fixture_copy: FixtureFactory, name: str) -> None:
    folder = fixture_copy()
    (folder / name).unlink()
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(str(folder / name)) and "not found" in p for p in problems), problems


@pytest.mark.parametrize("name", ["cluster.env", "mesh.yaml", "hosts"])
def test_unreadable_file(fixture_copy: FixtureFactory, name: str) -> None:
    folder = fixture_copy()
    (folder / name).unlink()
    (folder / name).mkdir()  # root can read any mode, so a directory stands in for an unreadable file
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(str(folder / name)) and "directory" in p for p in problems), problems


def test_bad_yaml_names_file_and_line(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    (folder / "mesh.yaml").write_text("defaultConfig:\n  proxyMetadata:\n    A: 'x\n  readinessProbe: [\n")
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(f"{folder / 'mesh.yaml'}:") and "YAML" in p for p in problems), problems


def test_bad_port_names_line_and_key(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    text = (folder / "mesh.yaml").read_text().replace("port: 8080", "port: 0")
    (folder / "mesh.yaml").write_text(text)
    line = text.splitlines().index("      port: 0") + 1
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert (
        f"{folder / 'mesh.yaml'}:{line}: defaultConfig.readinessProbe.httpGet.port: expected 1-65535, got 0" in problems
    )


@pytest.mark.parametrize(
    ("probe", "fragment"),
    [
        ("  readinessProbe:\n    periodSeconds: 5\n", "expected exactly one probe method"),
        ("  readinessProbe:\n    httpsGet:\n      port: 80\n", "defaultConfig.readinessProbe.httpsGet: unknown field"),
        (
            "  readinessProbe:\n    httpGet:\n      port: 80\n    tcpSocket:\n      port: 81\n",
            "found httpGet, tcpSocket",
        ),
        ("  readinessProbe:\n    tcpSocket:\n      port: 70000\n", "tcpSocket.port: expected 1-65535, got 70000"),
        ("  readinessProbe:\n    exec:\n      command: []\n", "exec.command: expected a non-empty list"),
        ("  readinessProbe:\n    httpGet:\n      port: 80\n      scheme: FTP\n", "scheme: expected HTTP or HTTPS"),
        ("  readinessProbe:\n    grpc:\n      port: x\n", "grpc.port: expected an integer"),
    ],
)
def test_bad_probe(fixture_copy: FixtureFactory, probe: str, fragment: str) -> None:
    folder = fixture_copy()
    text = (folder / "mesh.yaml").read_text()
    head = text[: text.index("  readinessProbe:")]
    (folder / "mesh.yaml").write_text(head + probe)
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(str(folder / "mesh.yaml") in p and fragment in p for p in problems), problems


@pytest.mark.parametrize("value", ["10", "1x", "ten seconds", "5 s"])
def test_bad_duration_in_mesh(fixture_copy: FixtureFactory, value: str) -> None:
    folder = fixture_copy()
    text = (folder / "mesh.yaml").read_text()
    (folder / "mesh.yaml").write_text(text.replace("defaultConfig:\n", f"defaultConfig:\n  drainDuration: '{value}'\n"))
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(
        p.startswith(f"{folder / 'mesh.yaml'}:2: defaultConfig.drainDuration: expected a duration like 10s or 1m30s")
        for p in problems
    ), problems


def test_good_durations_accepted(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    text = (folder / "mesh.yaml").read_text()
    mesh = text.replace("defaultConfig:\n", "defaultConfig:\n  drainDuration: 1m30s\n  terminationDrainDuration: 10s\n")
    (folder / "mesh.yaml").write_text(mesh)
    rc, problems, _out = check(folder, fixture_copy.resolv_conf)
    assert rc == 0, problems


def test_bad_duration_in_env(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    with (folder / "cluster.env").open("a") as f:
        f.write("SECRET_TTL='1 day'\n")
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(f"{folder / 'cluster.env'}:21: SECRET_TTL: expected a duration") for p in problems), (
        problems
    )


def test_invalid_pem(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    (folder / "root-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n")
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(str(folder / "root-cert.pem")) and "PEM" in p for p in problems), problems


def test_empty_token(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    (folder / "istio-token").write_text("  \n")
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(str(folder / "istio-token")) and "empty" in p for p in problems), problems


def test_cluster_env_syntax_error_names_line(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    with (folder / "cluster.env").open("a") as f:
        f.write("BROKEN=$(curl evil)\n")
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(p.startswith(f"{folder / 'cluster.env'}:21:") and "command substitution" in p for p in problems)


def test_all_problems_reported_in_one_run(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy(valid=False)
    text = (folder / "mesh.yaml").read_text().replace("port: 8080", "port: 0")
    (folder / "mesh.yaml").write_text(text.replace("defaultConfig:\n", "defaultConfig:\n  drainDuration: soon\n"))
    with (folder / "cluster.env").open("a") as f:
        f.write("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE='22,abc'\n")
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    joined = "\n".join(problems)
    for fragment in (
        "root-cert.pem",
        "istio-token",
        "httpGet.port",
        "drainDuration",
        "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
    ):
        assert fragment in joined, joined
    assert len(problems) >= 5


def test_bad_metajson(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    text = (folder / "cluster.env").read_text()
    (folder / "cluster.env").write_text(text.replace("ISTIO_METAJSON_LABELS='{", "ISTIO_METAJSON_LABELS='{oops"))
    rc, problems, _ = check(folder, fixture_copy.resolv_conf)
    assert rc == 2
    assert any(f"{folder / 'cluster.env'}:7: ISTIO_METAJSON_LABELS: expected a JSON object" in p for p in problems)


def test_proxy_config_env_problem_names_proxy_config(fixture_copy: FixtureFactory) -> None:
    folder = fixture_copy()
    rc, problems, _ = check(folder, fixture_copy.resolv_conf, "PROXY_CONFIG=statusPort: 99999")
    assert rc == 2
    assert any(p.startswith("PROXY_CONFIG:1: statusPort: expected 1-65535") for p in problems), problems
