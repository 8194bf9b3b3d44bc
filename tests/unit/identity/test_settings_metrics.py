"""Settings validation and the identity metrics exposed through the agent's registry."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from tests.unit.identity.ca_server import LocalCAServer
from tests.unit.identity.conftest import fast_backoff, identity_settings, make_token, running
from vm_agent.identity.manager import SecretManager
from vm_agent.metrics import REGISTRY, generate_latest


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rsa_key_size": 1024, "key_algorithm": "RSA"}, "WORKLOAD_RSA_KEY_SIZE"),
        ({"key_algorithm": "ED25519"}, "key algorithm"),
        ({"ec_curve": "P521"}, "ECC_CURVE"),
        ({"requested_ttl_seconds": 0}, "SECRET_TTL"),
        ({"grace_ratio": 1.5}, "SECRET_GRACE_PERIOD_RATIO"),
        ({"namespace": ""}, "namespace"),
    ],
)
def test_bad_settings_are_refused_up_front(tmp_path: Path, change: dict[str, object], words: str) -> None:
    server = LocalCAServer()
    server.port = 1
    (tmp_path / "root-cert.pem").write_bytes(server.ca.pem)
    settings = dataclasses.replace(identity_settings(tmp_path, server), **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=words):
        SecretManager(settings)


def _sample(text: str, name: str, label: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + (label or " ")) or (not label and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_follow_certificate_and_token(tmp_path: Path, ca_server: LocalCAServer) -> None:
    before = generate_latest(REGISTRY).decode()
    rejected_before = _sample(before, "vm_agent_identity_failures_total", '{reason="no_credentials"}') or 0.0
    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=fast_backoff())
    async with running(manager):
        while manager.snapshot()["failures"] < 1:
            await asyncio.sleep(0.02)
        token = make_token(ttl=1800)
        (tmp_path / "istio-token").write_text(token)
        await asyncio.wait_for(manager.ready.wait(), 10)
    text = generate_latest(REGISTRY).decode()
    svid = manager.svid
    assert svid is not None
    assert _sample(text, "vm_agent_identity_cert_expiry_timestamp_seconds") == svid.not_after.timestamp()
    last = _sample(text, "vm_agent_identity_cert_last_rotation_timestamp_seconds")
    assert last is not None
    assert abs(last - dt.datetime.now(dt.UTC).timestamp()) < 30
    token_exp = _sample(text, "vm_agent_identity_token_expiry_timestamp_seconds")
    assert token_exp is not None
    assert abs(token_exp - (dt.datetime.now(dt.UTC).timestamp() + 1800)) < 60
    failures = _sample(text, "vm_agent_identity_failures_total", '{reason="no_credentials"}')
    assert failures is not None
    assert failures >= rejected_before + 1
    assert (_sample(text, "vm_agent_identity_rotations_total") or 0) >= 1
