"""The ``simpool`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    simpool fit -c configs/quickstart.yaml
    simpool test -c configs/quickstart.yaml --ckpt_path <run>/checkpoints/last.ckpt
    simpool predict -c configs/quickstart.yaml --ckpt_path ... --prediction_writer.output_dir preds

Model and data are chosen in the config by ``class_path`` (any LightningModule and
LightningDataModule, the project's own by short name); configs are parsed with omegaconf
interpolation (``${data.init_args.num_classes}``) and unknown keys are errors.

The run folder is ``trainer.default_root_dir``: the logger's ``save_dir`` is linked to it, so
``--trainer.default_root_dir runs/other`` moves the logs, the attention-map images (written to the
logger's folder) and the checkpoints (recipes leave ``ModelCheckpoint.dirpath`` unset, which Lightning
resolves to ``<logger folder>/checkpoints``) together, and ``--ckpt_path last`` with the same
override finds the newest state there. A logger given on the command line gets the same ``save_dir``.
"""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import simpool_lightning.data  # noqa: F401  (registers the DataModules for short class names)
import simpool_lightning.models  # noqa: F401  (registers the LightningModules for short class names)
from simpool_lightning.callbacks import PredictionWriter

__all__ = ["SimPoolCLI", "main"]


class SimPoolCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        # One key moves a whole run: configs repeating the folder in each path drifted apart under
        # an override of one of them. The link is applied when parsing, so any logger class takes it.
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")


def main(args: Optional[list[str]] = None) -> None:
    SimPoolCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
