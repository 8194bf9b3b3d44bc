"""Where the read-only shared fixtures are: beside the checkout (CI clones next to a copy of shared/)."""

from __future__ import annotations

from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """``../shared`` beside the checkout; never a fixed absolute path (a fresh clone has its own)."""
    return _REPO.parent / "shared"


ISTIOCTL_FIXTURES = shared_dir() / "fixtures" / "istioctl"
