"""The package type-checks: mypy over cpfx, passes and kernels, as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.graph
def test_mypy_reports_no_errors():
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the [test] extras)")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    assert "Success: no issues found" in proc.stdout, proc.stdout
