"""Run a test body in a fresh interpreter.

Multi-process tests fork their workers (gloo on CPU, Lightning's ``ddp_fork``): forking the pytest
process after earlier tests have started threads (loggers, loader workers, thread pools) can
leave the children deadlocked in their first collective. A fresh interpreter forks from a clean
state, and a hang becomes a timeout that fails the test instead of blocking the suite.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_isolated(target: str, *args: str, timeout: float = 300) -> None:
    """Call ``module:function(*args)`` in a new Python process; fail with its output if it fails."""
    module, function = target.split(":")
    code = f"import sys, {module} as m; m.{function}(*sys.argv[1:])"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{target} did not finish in {timeout} s (deadlocked collective?)") from err
    assert result.returncode == 0, f"{target} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
