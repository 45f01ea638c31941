"""Shared fixtures: throw-away namespaces (removed also on failure) and the project's venv."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from firewall_view import BACKENDS
from nslab import Netns, remove_all, sweep_run_prefix

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() == 0:
        sweep_run_prefix()


@pytest.fixture
def netns() -> Iterator[type[Netns]]:
    """A factory: netns("host") makes a namespace removed when the test ends, pass or fail."""
    made: list[Netns] = []

    def make(name: str) -> Netns:
        ns = Netns(name)
        made.append(ns)
        return ns

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    try:
        yield make  # type: ignore[misc]
    finally:
        remove_all(reversed(made))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each firewall backend in turn: the same test runs against both."""
    return str(request.param)
