"""Logging: one line per event, text or JSON, a scope per component, tokens and keys never written."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from vm_agent.logs import JsonFormatter, TextFormatter, get_logger, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YmFyOnNhIn0.c2lnbmF0dXJlLXZhbHVl"
KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"


def test_redact_tokens_bearer_and_keys() -> None:
    text = redact(f"token {JWT} header authorization: Bearer abc.def-ghi key {KEY} done")
    assert JWT not in text
    assert "abc.def-ghi" not in text
    assert "MIIEowIBAAKCAQEA" not in text
    assert text.endswith("done")


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("vm_agent.identity", logging.WARNING, __file__, 1, msg, args, None)


def test_formats_carry_scope_and_one_line() -> None:
    text = TextFormatter().format(_record("renewal failed: %s", "CA unreachable"))
    assert "\twarning\tidentity\trenewal failed: CA unreachable" in text
    assert "\n" not in text
    doc = json.loads(JsonFormatter().format(_record("x=%d", 3)))
    assert doc["scope"] == "identity"
    assert doc["level"] == "warning"
    assert doc["msg"] == "x=3"


def test_agent_process_never_logs_a_token() -> None:
    code = (
        "from vm_agent import logs\n"
        "logs.setup('debug', 'json')\n"
        f"logs.get_logger('identity').error('got %s and %s', {JWT!r}, {KEY!r})\n"
        f"logs.get_logger('xds').info('metadata authorization: Bearer {JWT}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        doc = json.loads(line)
        assert JWT not in line
        assert "PRIVATE KEY-----\nMII" not in doc["msg"]
    assert get_logger("dns").name == "vm_agent.dns"
