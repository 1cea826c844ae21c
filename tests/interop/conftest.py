"""The opt-in interop suite (``make test-interop``): real fairseq as the oracle, in its own venv
(``.venv-interop``). In the default venv these tests are skipped (no fairseq installed)."""
from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "interop: needs the peer libraries of .venv-interop (make test-interop)")
