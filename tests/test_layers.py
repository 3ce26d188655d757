"""The import-linter contracts in pyproject.toml hold: no upward import between the layers of the
data path, no cycle, and the store stays free of the layers above it (`lint-imports`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=REPO,  # lint-imports puts the working directory first on sys.path: this checkout
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
