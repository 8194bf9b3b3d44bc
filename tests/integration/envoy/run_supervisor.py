"""Child process for the orphan test: runs an ADS stub and a Supervisor, prints Envoy's pid once ready."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.integration.envoy.ads_stub import AdsStub, envoy_settings_for_test
from vm_agent.envoy import Supervisor


async def main(tmp: Path) -> None:
    ads = AdsStub(tmp / "XDS")
    await ads.start()
    sup = Supervisor(envoy_settings_for_test(tmp))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(sup.run())
        while await sup.admin.ready() is not None:
            await asyncio.sleep(0.1)
        print(sup.pid, flush=True)


if __name__ == "__main__":
    if sys.argv[2:] == ["no-setpriv"]:
        # Exercise the fallback for hosts without util-linux's setpriv: the preexec prctl hook.
        import shutil

        setattr(shutil, "which", lambda *args, **kwargs: None)  # noqa: B010 - a plain assignment upsets mypy
    asyncio.run(main(Path(sys.argv[1])))
