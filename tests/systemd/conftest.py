"""The systemd module's numbers (rootfs build, boot, exposure score) in the run's summary."""

from __future__ import annotations

import pytest
from _pytest.terminal import TerminalReporter


def pytest_terminal_summary(terminalreporter: TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    from test_systemd_unit import REPORT

    if REPORT:
        terminalreporter.write_sep("-", "systemd container")
        terminalreporter.write_line(", ".join(f"{key} {value}" for key, value in REPORT.items()))
