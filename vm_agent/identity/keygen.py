"""A new key and CSR come from a short-lived helper process (``keygen.main`` in a fresh interpreter).

The agent needs the ``cryptography`` library only to make a key and CSR: at start (without a persisted
certificate) and at each rotation, twice a day by default. Loading it into the agent would keep ~7 MiB of
its memory busy for good (bench/results/memory.md), so a helper makes them and exits; everything the agent
reads from certificates and keys afterwards, ``vm_agent.identity.der`` reads without it. The helper runs on
another core while the agent starts, so the first CSR is usually ready by the time the CA can be called.

The key comes back on the helper's stdout, through a pipe: it is never written anywhere but the state
folder (0600), as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import asdict, dataclass

HELPER_TIMEOUT_S = 60.0
_BAD_SETTINGS = 2
# The helper runs with exactly the agent's module path (the package's launcher builds it; -I ignores the
# environment's), so it finds vm_agent and cryptography wherever the agent found them.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from vm_agent.identity.keygen import main; raise SystemExit(main(sys.argv[2]))"
)


@dataclass(frozen=True)
class KeySpec:
    uri: str
    key_algorithm: str = "RSA"
    rsa_key_size: int = 2048
    ec_curve: str = "P256"
    pkcs8: bool = False


class KeygenError(Exception):
    """The helper could not make a key and CSR (it could not start, crashed, or said something unreadable)."""


async def _spawn(spec: KeySpec) -> asyncio.subprocess.Process:
    # The request rides on argv (nothing in it is secret), so the helper starts working at once even while
    # the agent is busy; its answer waits in the pipe until read.
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-c",
            _BOOT,
            json.dumps(sys.path),
            json.dumps(asdict(spec)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise KeygenError(f"cannot start the key helper {sys.executable}: {exc.strerror or exc}") from exc


async def _answer(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    try:
        async with asyncio.timeout(HELPER_TIMEOUT_S):
            out, err = await proc.communicate()
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise KeygenError(f"the key helper did not answer within {HELPER_TIMEOUT_S:g}s") from None
        raise
    message = err.decode(errors="replace").strip()
    if proc.returncode == _BAD_SETTINGS:
        raise ValueError(message)
    if proc.returncode != 0:
        raise KeygenError(f"the key helper failed (exit status {proc.returncode}): {message[-500:]}")
    try:
        doc = json.loads(out)
        return doc["key"].encode(), doc["csr"].encode()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeygenError("the key helper answered something that is not a key and CSR") from exc


async def make_key_and_csr(spec: KeySpec) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) from a fresh helper; ``ValueError`` names a bad setting, ``KeygenError`` the rest."""
    return await _answer(await _spawn(spec))


class KeyMaker:
    """Keys and CSRs for one identity; ``prefetch()`` starts the next one before it is asked for."""

    def __init__(self, spec: KeySpec) -> None:
        self.spec = spec
        self._next: asyncio.Task[tuple[bytes, bytes]] | None = None

    async def prefetch(self) -> None:
        """Start the helper for the next key now and return once it runs (the agent does this at start when no
        certificate is persisted); a failure to start it is left for ``make()`` to report."""
        if self._next is not None:
            return
        try:
            proc = await _spawn(self.spec)
        except KeygenError:
            return
        self._next = asyncio.ensure_future(_answer(proc))

    def prefetch_soon(self) -> None:
        """Have the next key made in the background (after a rotation: the next one then never waits for it)."""
        if self._next is None:
            self._next = asyncio.ensure_future(make_key_and_csr(self.spec))

    async def make(self) -> tuple[bytes, bytes]:
        """A key and CSR used by nobody else: the prefetched one if any, else a new one."""
        task, self._next = self._next, None
        if task is not None:
            return await task
        return await make_key_and_csr(self.spec)

    async def aclose(self) -> None:
        """Stop a helper still making a key (it is killed and reaped: nothing outlives the agent's loop)."""
        task, self._next = self._next, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KeygenError, ValueError):
                await task


def main(request: str | None = None) -> int:
    """The helper: a KeySpec as JSON (``request``, else argv[1]), {"key", "csr"} PEMs as JSON on stdout."""
    from vm_agent.identity.csr import generate_key_and_csr

    spec = KeySpec(**json.loads(request if request is not None else sys.argv[1]))
    try:
        key, csr = generate_key_and_csr(
            spec.uri,
            key_algorithm=spec.key_algorithm,
            rsa_key_size=spec.rsa_key_size,
            ec_curve=spec.ec_curve,
            pkcs8=spec.pkcs8,
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return _BAD_SETTINGS
    json.dump({"key": key.decode(), "csr": csr.decode()}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
