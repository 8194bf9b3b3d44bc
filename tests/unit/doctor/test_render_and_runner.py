"""Doctor's output (text and the documented JSON schema), the runner's guarantees, and the docs listing every check."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from tests.unit.doctor.conftest import VmFiles
from vm_agent.config import ExecAction, GrpcAction, HttpGetAction, TcpSocketAction
from vm_agent.doctor import CHECK_IDS, SCHEMA_VERSION, CheckResult, DoctorOptions, Status, to_json, to_text
from vm_agent.doctor.capture import _mesh_name
from vm_agent.doctor.context import Context
from vm_agent.doctor.result import fail, ok, skip, warn
from vm_agent.doctor.runner import run
from vm_agent.doctor.workload import describe_probe

DOCS = Path(__file__).resolve().parents[3] / "docs" / "doctor.md"

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----"

RESULTS = [
    ok("config", "read without problems", files=["a"], problems=[]),
    fail("token", f"the token {JWT} expired", "put a fresh one there", path="/t"),
    warn("agent", "not running", "start it"),
    skip("dns-capture", "DNS capture is off"),
    fail("ca", "bad", "fix it", problems=["/x/cluster.env:3: CA_ADDR: expected host:port"], blob=KEY),
]


def test_json_schema_keys_are_pinned() -> None:
    doc = to_json(RESULTS)
    assert list(doc) == ["schema", "ok", "counts", "checks"]
    assert doc["schema"] == SCHEMA_VERSION == 1
    assert doc["ok"] is False
    assert doc["counts"] == {"ok": 1, "warn": 1, "fail": 2, "skip": 1}
    for check in doc["checks"]:
        assert list(check) == ["id", "status", "summary", "hint", "details"]
    assert doc["checks"][0] == {
        "id": "config",
        "status": "ok",
        "summary": "read without problems",
        "hint": None,
        "details": {"files": ["a"], "problems": []},
    }
    assert to_json(RESULTS[:1])["ok"] is True
    json.dumps(doc)  # serialisable as is


def test_no_token_or_key_in_any_output() -> None:
    text, doc = to_text(RESULTS), json.dumps(to_json(RESULTS))
    for out in (text, doc):
        assert JWT not in out and "BEGIN PRIVATE KEY" not in out
        assert "<redacted token>" in out


def test_text_lines() -> None:
    lines = to_text(RESULTS).splitlines()
    assert lines[0] == "ok    config           read without problems"
    assert lines[1].startswith("fail  token            the token ")
    assert lines[2] == " " * 23 + "fix: put a fresh one there"
    assert lines[3] == "warn  agent            not running"
    assert lines[4] == " " * 23 + "fix: start it"
    assert lines[5] == "skip  dns-capture      DNS capture is off"
    assert lines[6] == "fail  ca               bad"
    assert lines[7] == " " * 23 + "/x/cluster.env:3: CA_ADDR: expected host:port"
    assert lines[8] == " " * 23 + "fix: fix it"
    assert lines[-1] == "5 checks: 1 ok, 1 warning(s), 2 failed, 1 skipped; fix the failed lines above"


def test_every_check_is_documented() -> None:
    text = DOCS.read_text()
    checks = text.split("## The checks", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `([a-z-]+)` \|", checks, re.M) == list(CHECK_IDS)
    details = text.split("`details` per check", 1)[1].split("\n## ", 1)[0]
    documented = [
        i for row in re.findall(r"^\| (`[a-z-]+`(?:, `[a-z-]+`)*) \|", details, re.M) for i in row.split(", ")
    ]
    assert [i.strip("`") for i in documented] == list(CHECK_IDS)


# --- the runner ------------------------------------------------------------------------------------------------


def run_these(files: VmFiles, checks: list[tuple[str, object]], **options: float) -> list[CheckResult]:
    return asyncio.run(run(files.config(), DoctorOptions(**options), checks))  # type: ignore[arg-type]


def test_a_broken_check_is_one_failed_line(files: VmFiles) -> None:
    async def broken(ctx: Context) -> CheckResult:
        raise ValueError("boom")

    async def fine(ctx: Context) -> CheckResult:
        return ok("fine", "all good")

    async def misnamed(ctx: Context) -> CheckResult:
        return ok("something-else", "?")

    results = run_these(files, [("broken", broken), ("fine", fine), ("misnamed", misnamed)])
    assert [(r.id, r.status) for r in results] == [
        ("broken", Status.FAIL),
        ("fine", Status.OK),
        ("misnamed", Status.FAIL),
    ]
    assert results[0].summary == "the check itself failed: ValueError: boom"
    assert "it answered as 'something-else'" in results[2].summary


def test_a_check_that_hangs_is_cut_at_its_deadline(files: VmFiles) -> None:
    async def hangs(ctx: Context) -> CheckResult:
        await asyncio.sleep(30)
        return ok("hangs", "never")

    async def waits_for_it(ctx: Context) -> CheckResult:
        earlier = await ctx.result("hangs", for_check="after")
        return ok("after", f"saw {earlier.status.value}")

    results = run_these(files, [("hangs", hangs), ("after", waits_for_it)], check_deadline_s=0.2)
    assert results[0].status is Status.FAIL and results[0].summary == "the check did not finish within 0.2s"
    # The dependant was not cancelled with it: it saw the failed line.
    assert results[1].summary == "saw fail"


def test_checks_run_concurrently_and_may_only_wait_for_earlier_ones(files: VmFiles) -> None:
    # The first check can only finish because a later one runs at the same time (sequentially it would hit its
    # deadline): doctor's worst case is the slowest check, not the sum of every timeout.
    later_started = asyncio.Event()

    async def first(ctx: Context) -> CheckResult:
        await later_started.wait()
        return ok("first", "done")

    async def looks_ahead(ctx: Context) -> CheckResult:
        await ctx.result("last", for_check="looks-ahead")
        return ok("looks-ahead", "?")

    async def last(ctx: Context) -> CheckResult:
        later_started.set()
        return ok("last", "done")

    results = run_these(files, [("first", first), ("looks-ahead", looks_ahead), ("last", last)], check_deadline_s=5)
    assert [r.status for r in results] == [Status.OK, Status.FAIL, Status.OK]
    assert "may only depend on earlier checks" in results[1].summary


# --- small pure parts --------------------------------------------------------------------------------------------


def test_probe_descriptions() -> None:
    assert describe_probe(HttpGetAction(port=8080, path="/ready"), "10.0.0.5") == "httpGet http://10.0.0.5:8080/ready"
    assert describe_probe(HttpGetAction(port=443, host="::1", scheme="https"), "x") == "httpGet https://[::1]:443/"
    assert describe_probe(TcpSocketAction(port=5432), "10.0.0.5") == "tcpSocket 10.0.0.5:5432"
    assert describe_probe(ExecAction(command=("cat", "/tmp/ok")), "x") == "exec cat /tmp/ok"
    assert describe_probe(GrpcAction(port=9000, service="db"), "10.0.0.5") == "grpc 10.0.0.5:9000 service db"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({}, None),
        ({"loaded": False}, None),
        (
            {"table": {"table": {"b.ns.svc.cluster.local": {"ips": ["fd00::1"]}, "a.ns.svc": {"ips": ["10.0.0.1"]}}}},
            ("a.ns.svc", "A", ["10.0.0.1"]),
        ),
        ({"table": {"table": {"b.ns.svc": {"ips": ["fd00::1"]}, "c.ns.svc": {}}}}, ("b.ns.svc", "AAAA", ["fd00::1"])),
    ],
)
def test_mesh_name_for_the_dns_check(table: dict[str, object], expected: object) -> None:
    assert _mesh_name(table) == expected
