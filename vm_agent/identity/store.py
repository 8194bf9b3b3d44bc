"""Atomic files for the SVID: key.pem (0600), cert-chain.pem and root-cert.pem in a folder.

The same layout serves the agent's state folder (what lets a rebooted VM come back on its own
certificate) and istio's optional OUTPUT_CERTS folder.
"""

from __future__ import annotations

from pathlib import Path

from vm_agent.files import atomic_write

__all__ = ["atomic_write"]  # re-exported: the SVID store was its first user

KEY_FILE = "key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOT_FILE = "root-cert.pem"


def write_svid_files(
    folder: Path, key_pem: bytes, chain_pem: bytes, root_pem: bytes, *, public_mode: int = 0o644
) -> None:
    """Write the three files; the key first so a crash in between leaves a mismatch the loader rejects."""
    atomic_write(folder / KEY_FILE, key_pem, 0o600)
    atomic_write(folder / CHAIN_FILE, chain_pem, public_mode)
    if root_pem:
        atomic_write(folder / ROOT_FILE, root_pem, public_mode)


def read_svid_files(folder: Path) -> tuple[bytes, bytes, bytes] | None:
    """(key, chain, root) as stored, or ``None`` when key or chain is missing/empty (root may be empty)."""
    try:
        key = (folder / KEY_FILE).read_bytes()
        chain = (folder / CHAIN_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        root = (folder / ROOT_FILE).read_bytes()
    except FileNotFoundError:
        root = b""
    if not key.strip() or not chain.strip():
        return None
    return key, chain, root
