"""The package's layers (setup.cfg, [importlinter]) hold: each layer imports only those below it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contract_is_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the dev extras (pip install -e '.[dev]')")
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_old_metric_paths_still_import_with_a_deprecation_warning() -> None:
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n    import simpool_lightning.evaluation.localization\nexcept DeprecationWarning as w:\n    print(w)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "moved to simpool_lightning.metrics.localization" in out
    from simpool_lightning.evaluation import MaxBoxAccV2, knn_classify  # the package path keeps its names
    from simpool_lightning.metrics import MaxBoxAccV2 as M, knn_classify as k

    assert MaxBoxAccV2 is M and knn_classify is k
