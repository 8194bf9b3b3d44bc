from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers.net import free_port
from tests.integration.envoy.ads_stub import AdsStub


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="vma-envoy-") as d:
        yield Path(d)


@pytest.fixture
async def ads(short_tmp: Path) -> AsyncIterator[AdsStub]:
    stub = AdsStub(short_tmp / "XDS", inbound_port=free_port())
    await stub.start()
    try:
        yield stub
    finally:
        await stub.stop()
