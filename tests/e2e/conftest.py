"""End-to-end fixtures: `report` records a measured number; the summary prints them all."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support import MEASUREMENTS, measured


@pytest.fixture
def report() -> Callable[[str], None]:
    return measured


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("e2e measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)
