"""A quiet one-process CPU Trainer for the tests: no logger, checkpoints, bar or summary unless asked."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import pytorch_lightning as pl


def trainer(tmp_path: Union[str, Path], **kwargs: Any) -> pl.Trainer:
    """One epoch on one CPU process under ``tmp_path``; ``kwargs`` override any of it."""
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    args.update(kwargs)
    return pl.Trainer(**args)
