"""benchmarks/attention_figure.py: the README's picture, from a benchmark run (fast mode here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_figure_script_in_fast_mode_writes_a_png_of_the_expected_layout(tmp_path: Path) -> None:
    out = tmp_path / "figure" / "attention.png"
    # As a user runs it: a script beside the benchmark it reads (4 images, tiny models, 1 epoch).
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention_figure.py"), "--fast", str(out), "--panel-inches", "1.0"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| simpool (2 heads) |" in result.stdout and "| avg (GAP-CAM) |" in result.stdout  # the benchmark's table
    image = np.asarray(Image.open(out).convert("RGB"))
    height, width, _ = image.shape
    # 4 image columns; rows: the image, then heat map and contour for [CLS], SimPool and GAP-CAM.
    columns, rows = 4, 1 + 2 * 3
    assert abs(height / width - rows / columns) < 0.12 * rows / columns, (height, width)
    assert 100 * rows * 0.9 < height < 100 * rows * 1.2  # panels of 1 inch at 100 dpi, plus margins
    assert image.std() > 20  # pictures, not a blank canvas
    assert out.stat().st_size < 1_000_000
