"""Running the `simpool` command in a test: a GPU recipe on one CPU process, and what it logged."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from simpool_lightning.cli import main


def on_cpu(tmp_path: Path) -> list[str]:
    """Overrides that run any recipe on one CPU process in fp32, loading in-process, under ``tmp_path``."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.num_workers=0",
    ]


def simpool_test(config: str, tmp_path: Path, *overrides: str) -> dict[str, float]:
    """``simpool test -c config`` on CPU with a CSV logger; the ``test/*`` metrics it logged."""
    logs = tmp_path / "logs"
    # The CLI links the logger's save_dir to the run folder, default_root_dir.
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger"}
    main(["test", "-c", config, *on_cpu(tmp_path), f"--trainer.default_root_dir={logs}", f"--trainer.logger={json.dumps(logger)}", *overrides])
    (metrics_file,) = logs.rglob("metrics.csv")
    with open(metrics_file) as f:
        (row,) = csv.DictReader(f)
    return {key: float(value) for key, value in row.items() if value and key.startswith("test/")}
