from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from .test_fuzz import SUMMARY

    if SUMMARY:
        terminalreporter.section("fuzz: outcomes per modality")
        for line in SUMMARY:
            terminalreporter.write_line(line)
