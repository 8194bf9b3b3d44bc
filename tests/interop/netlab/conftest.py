"""One network lab per session (tests/interop/run.sh runs this folder in its own pytest invocation)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.interop.lab import Binaries, LabError, cache_dir
from tests.interop.netlab import netns
from tests.interop.netlab.ingress import IngressGateway
from tests.interop.netlab.multinet import MultiNetwork
from tests.interop.netlab.world import NetLab, missing_tools

_LAB: list[NetLab] = []


@pytest.fixture(scope="session")
def lab() -> Iterator[NetLab]:
    reason = netns.unavailable() or missing_tools()
    if reason:
        pytest.skip(reason)
    try:
        bins = Binaries.find()
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    stale = netns.remove_stale()
    if stale:
        print(f"removed {len(stale)} namespaces left by an earlier run: {', '.join(stale)}")
    world = NetLab(bins)
    _LAB.append(world)
    try:
        world.start()
    except BaseException:
        world.destroy()
        raise
    try:
        yield world
    finally:
        world.destroy()


@pytest.fixture(scope="session")
def multinet(lab: NetLab) -> Iterator[MultiNetwork]:
    """vm-net, its VM and the two east-west gateways, added to the running lab the first time a test asks."""
    net = MultiNetwork(lab)
    try:
        net.start()
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="session")
def ingress(lab: NetLab) -> Iterator[IngressGateway]:
    """An ingress gateway VM in front of forum (the gateway role on its own)."""
    gw = IngressGateway(lab)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Read back from the file the lab saved: this hook may see another import of this module than the fixture.
    figures = cache_dir() / "last-run-logs" / "netlab-figures.json"
    if _LAB and figures.is_file():
        terminalreporter.section("network lab figures (docs/interop.md)")
        for key, value in sorted(json.loads(figures.read_text()).items()):
            terminalreporter.write_line(f"{key}: {json.dumps(value)}")
