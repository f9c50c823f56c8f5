"""pretrained_path through the weights layer: every tensor lands bit for bit where its file put it.

The official layouts are fabricated by tests/test_interop.py's builders (the authors' key names);
the expected place of each key is written out here by hand, independently of
``simpool_lightning.weights.official``'s rules, and ``load_official`` (which renames the other way,
from our names to the official ones) must agree with ``pretrained_path`` bit for bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import Tensor

from simpool_lightning.interop import load_official
from simpool_lightning.models import DINO, PooledBackbone
from simpool_lightning.weights.pos_embed import simpool_forward_table
from tests.test_interop import (
    VIT,
    VIT_KWARGS,
    _official_dino_vit,
    _supervised_convnext,
    _supervised_resnet,
    _supervised_vit,
)


def _official_name_supervised(pool_prefix: str, norm_prefix: str | None) -> Callable[[str], str]:
    def name(ours: str) -> str:
        if ours.startswith("pool."):
            return pool_prefix + ours[len("pool.") :]
        if ours.startswith("final_norm."):
            assert norm_prefix is not None, ours
            return norm_prefix + ours[len("final_norm.") :]
        assert ours.startswith("model."), ours
        return ours[len("model.") :]

    return name


SUPERVISED = {
    "vit": (_supervised_vit, VIT, dict(VIT_KWARGS), "gp.pool.", None),
    "resnet": (_supervised_resnet, "resnet18", {}, "global_pool.pool.", None),
    "convnext": (_supervised_convnext, "convnext_atto", {}, "head.global_pool.pool.", "head.norm."),
}


def _assert_bitwise(backbone: PooledBackbone, file_state: dict[str, Tensor], name: Callable[[str], str]) -> None:
    ours = backbone.state_dict()
    assert ours, "empty backbone"
    for key, value in ours.items():
        assert torch.equal(value, file_state[name(key)]), key


@pytest.mark.parametrize("family", sorted(SUPERVISED))
def test_official_supervised_files_load_bit_for_bit(family: str, tmp_path: Path) -> None:
    build, timm_name, kwargs, pool_prefix, norm_prefix = SUPERVISED[family]
    state, _ = build(1.25)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": state, "epoch": 0, "version": 2}, path)
    backbone = PooledBackbone(timm_name, "simpool", {"gamma": 1.25}, pretrained_path=str(path), **kwargs)
    _assert_bitwise(backbone, state, _official_name_supervised(pool_prefix, norm_prefix))

    model_kwargs = {"num_heads": kwargs["num_heads"]} if family == "vit" else {}
    built = load_official(path, backbone=timm_name, backbone_kwargs=model_kwargs, pool_kwargs={"gamma": 1.25})
    for key, value in built.backbone.state_dict().items():
        assert torch.equal(value, backbone.state_dict()[key]), key


def test_official_dino_file_loads_the_teacher_bit_for_bit(tmp_path: Path) -> None:
    student, _, _ = _official_dino_vit(seed=0)
    teacher, _, _ = _official_dino_vit(seed=10)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {"module." + k: v for k, v in student.items()}, "teacher": teacher, "args": {"gamma": 1.25}}, path)
    backbone = PooledBackbone(
        VIT, "simpool", {"gamma": 1.25, "use_beta": True}, placement="before_norm", pretrained_path=str(path), **VIT_KWARGS
    )

    def name(ours: str) -> str:
        for mine, theirs in (("pool.", "backbone.simpool."), ("final_norm.", "backbone.norm."), ("model.", "backbone.")):
            if ours.startswith(mine):
                return theirs + ours[len(mine) :]
        raise AssertionError(ours)

    # The fork's SimPool-mode forward resamples its position embedding at every forward; the import does it once.
    _assert_bitwise(backbone, {**teacher, "backbone.pos_embed": simpool_forward_table(teacher["backbone.pos_embed"])}, name)
    built = load_official(path, backbone=VIT, backbone_kwargs={"num_heads": 2}, pool_kwargs={"gamma": 1.25})
    assert isinstance(built, DINO)
    for key, value in built.teacher.backbone.state_dict().items():
        assert torch.equal(value, backbone.state_dict()[key]), key
