"""Shared fixtures. Tests that need root, BPF or tracefs skip with the reason elsewhere and run in CI here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["gthulhu_fixtures"]  # the Gthulhu test server fixtures, for every test module

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def require_root(reason: str = "needs root") -> None:
    """Skip the calling test unless it runs as root."""
    if os.geteuid() != 0:
        pytest.skip(f"{reason}: not running as root")


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
