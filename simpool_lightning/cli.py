"""The ``simpool`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    simpool fit -c configs/quickstart.yaml
    simpool test -c configs/quickstart.yaml --ckpt_path <run>/checkpoints/last.ckpt
    simpool predict -c configs/quickstart.yaml --ckpt_path ... --prediction_writer.output_dir preds
    simpool predict -c configs/predict_images.yaml --ckpt_path <any checkpoint> --data.init_args.paths 'photos/*'
    simpool predict -c configs/predict_images.yaml --official <official file> --data.init_args.paths photos

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

import os
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import simpool_lightning.data  # noqa: F401  (registers the DataModules for short class names)
import simpool_lightning.models  # noqa: F401  (registers the LightningModules for short class names)
from simpool_lightning.callbacks import PredictionWriter
from simpool_lightning.data import ImageFilesDataModule
from simpool_lightning.interop import load_official

__all__ = ["SimPoolCLI", "main"]


class SimPoolCLI(LightningCLI):
    """LightningCLI with a ``prediction_writer`` and models from any checkpoint kind.

    The model may come from the config (``model``), from a Lightning checkpoint of
    ``ImageClassifier`` or ``DINO`` (``--ckpt_path`` alone: LightningCLI rebuilds the model its
    hyper-parameters record) or, for ``validate``, ``test`` and ``predict``, from an official
    SimPool file or timm state dict (``--official FILE``, read by
    :func:`~simpool_lightning.interop.load_official` with ``--official_kwargs``, e.g.
    ``'{"backbone": "vit_small_patch16_224", "pool_kwargs": {"gamma": 1.25}}'``).

    An :class:`~simpool_lightning.data.ImageFilesDataModule` whose ``image_size`` or ``crop_pct``
    is left ``None`` takes the checkpoint's: those of the DataModule it was fitted on (a Lightning
    checkpoint records them), else the ViT input size the model was built for.
    """

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's, with the model optional: a checkpoint (--ckpt_path, --official) can supply it.
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model, required=False)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data, required=False)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_argument(
            "--official", type=Optional[str], default=None,
            help="validate / test / predict the model in this official SimPool checkpoint or timm state dict",
        )
        parser.add_argument(
            "--official_kwargs", type=dict[str, Any], default={},
            help="keyword arguments of simpool_lightning.interop.load_official for --official",
        )
        # One key moves a whole run: configs repeating the folder in each path drifted apart under
        # an override of one of them. The link is applied when parsing, so any logger class takes it.
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("official"):
            if self.subcommand == "fit":
                raise ValueError(
                    "--official is for validate, test and predict; to train from an official file use "
                    "--model.init_args.pretrained_path"
                )
            if self.model is not None:
                raise ValueError(
                    f"--official {config['official']!r} and a model from the config or --ckpt_path "
                    f"({type(self.model).__name__}): give one of them"
                )
            self.model = load_official(config["official"], **config.get("official_kwargs", {}))
        if self.model is None:
            raise ValueError(
                "no model: give one in the config (model:), a Lightning checkpoint (--ckpt_path) or an official file (--official)"
            )
        if isinstance(self.datamodule, ImageFilesDataModule):
            self._fill_eval_settings(self.datamodule, config.get("ckpt_path"))

    def _fill_eval_settings(self, data: ImageFilesDataModule, ckpt_path: Optional[str]) -> None:
        """``image_size`` and ``crop_pct`` left ``None``: the fitted DataModule's, else the ViT's input size."""
        fitted: dict[str, Any] = {}
        if ckpt_path and os.path.isfile(ckpt_path):
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            fitted = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        built = (getattr(self.model, "hparams", {}).get("backbone_kwargs") or {}).get("img_size")
        if data.image_size is None:
            data.image_size = fitted.get("image_size") or (built if isinstance(built, int) else None)
        if data.crop_pct is None:
            data.crop_pct = fitted.get("crop_pct")


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
