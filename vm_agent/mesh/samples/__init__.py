"""Sample manifests for the local mesh demo: ``vm-agent mesh serve --manifests <this folder>``."""

from pathlib import Path


def samples_dir() -> Path:
    return Path(__file__).parent
