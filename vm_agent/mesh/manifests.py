"""The manifests folder: every *.yaml/*.yml/*.json file in it is the desired state of the objects it
names. Changes are picked up by polling; an invalid folder is refused as a whole and the last good
state stays."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from vm_agent.logs import get_logger
from vm_agent.mesh.store import Doc, ManifestErrors, ObjectStore, key_of, parse_yaml

log = get_logger("mesh.manifests")

SUFFIXES = (".yaml", ".yml", ".json")


class ManifestsFolder:
    def __init__(self, folder: Path, store: ObjectStore, poll_s: float) -> None:
        self._folder = folder
        self._store = store
        self._poll = poll_s
        self._signature: dict[str, str] | None = None
        self.last_error: str | None = None
        self.loads = 0

    def _scan(self) -> dict[str, str]:
        # Content hashes, not mtimes: two quick edits of equal size must not look unchanged.
        sig: dict[str, str] = {}
        if not self._folder.is_dir():
            return sig
        for path in sorted(self._folder.iterdir()):
            if path.suffix in SUFFIXES and path.is_file() and not path.name.startswith("."):
                try:
                    sig[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:
                    sig[str(path)] = "unreadable"
        return sig

    def reload(self) -> bool:
        """Apply the folder if it changed; returns whether the store was updated."""
        sig = self._scan()
        if sig == self._signature:
            return False
        self._signature = sig
        docs: list[Doc] = []
        sources: dict[int, str] = {}
        problems: list[str] = []
        for name in sig:
            try:
                text = Path(name).read_text()
                for doc in parse_yaml(text, name):
                    sources[id(doc)] = name
                    docs.append(doc)
            except ManifestErrors as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{name}: cannot read: {e}")
        seen: dict[tuple[str, str, str], str] = {}
        for doc in docs:
            k = key_of(doc)
            if k in seen and seen[k] != sources[id(doc)]:
                problems.append(
                    f"{sources[id(doc)]}: {k[0]} {k[1] + '/' if k[1] else ''}{k[2]}: metadata.name: "
                    f"also defined in {seen[k]}, expected each object in one file"
                )
            seen[k] = sources[id(doc)]
        if problems:
            self.last_error = "\n".join(problems)
            log.error("manifests in %s refused, keeping the last good state:\n%s", self._folder, self.last_error)
            return False
        self.last_error = None
        self._store.replace_source(str(self._folder) + "/", docs, lambda d: sources[id(d)])
        self.loads += 1
        log.info("manifests in %s applied (%d objects)", self._folder, len(docs))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                self.reload()
            except Exception:
                log.exception("manifests reload of %s failed", self._folder)

    def snapshot(self) -> dict[str, Any]:
        return {"folder": str(self._folder), "loads": self.loads, "error": self.last_error}
