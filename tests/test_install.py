"""The checkout never shadows an installed distribution: `passes/` and `kernels/` import only as
`cpfx.passes` and `cpfx.kernels`, also when the checkout root is first on `sys.path` (a script,
`python -c` or `python -m pytest` started in the checkout)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level folders that are not packages of the product (the test suite imports `tests.*`).
_NOT_SHIPPED = {"tests", "benchmarks", "examples"}


def test_no_top_level_folder_is_a_regular_package():
    """Only `cpfx` may be a regular package at the checkout's top level: any other folder with an
    `__init__.py` wins over an installed distribution of the same name."""
    shadowing = [
        d.name
        for d in ROOT.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and d.name not in _NOT_SHIPPED | {"cpfx"}
        and (d / "__init__.py").exists()
    ]
    assert shadowing == [], f"top-level folders importable as packages: {shadowing}"


def test_installed_kernels_wins_over_the_checkout():
    """With Hugging Face's `kernels` installed (transformers requires it), `import kernels` from
    the checkout root is that distribution, diffusers' peft integration imports, and cpfx's own
    kernels are `cpfx.kernels`."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` is not installed (it is in the [test] extras)")
    installed = Path(str(dist.locate_file(""))).resolve()
    code = (
        "import sys, os; sys.path.insert(0, os.getcwd());"
        "import kernels, diffusers.loaders.peft, cpfx.kernels.fp8, cpfx.passes.shard_tokens;"
        "print(kernels.__file__); print(cpfx.kernels.fp8.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels_file, fp8_file = (Path(p).resolve() for p in proc.stdout.split())
    assert installed in kernels_file.parents, (kernels_file, installed)
    assert kernels_file.parent != (ROOT / "kernels").resolve(), kernels_file
    assert fp8_file == (ROOT / "kernels" / "fp8.py").resolve(), fp8_file
