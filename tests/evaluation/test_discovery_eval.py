"""DiscoveryEvaluator: LOST and DINO-seg boxes of a real (tiny) ViT against LOST's code (tests/reference/lost.py)
fed with keys and [CLS] attention computed here without the evaluator's hook; CorLoc over a fabricated
COCO-20k; refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from simpool_lightning.data import COCO20kDataModule
from simpool_lightning.evaluation.discovery_eval import DiscoveryEvaluator
from simpool_lightning.metrics import CorLoc
from simpool_lightning.models import DINO, ImageClassifier
from tests.data.test_downstream_coco import make_coco
from tests.models.test_classifier import save_lightning_checkpoint
from tests.reference import lost as reference

# Two blocks, so that "the last block" is not the first; any input size, as LOST feeds images.
VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True))
PATCH = 8


def lost_padding(images: Tensor, patch: int = PATCH) -> Tensor:
    """main_lost.py: a zero image of whole patches with the image in its top-left corner."""
    b, c, h, w = images.shape
    padded = torch.zeros(b, c, -(-h // patch) * patch, -(-w // patch) * patch)
    padded[:, :, :h, :w] = images
    return padded


def last_block_qkv(vit, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of the last block as main_lost.py reshapes them: ``(B, tokens, dim)`` each, heads concatenated."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for blk in vit.blocks[:-1]:
        x = blk(x)
    attn = vit.blocks[-1].attn
    qkv = attn.qkv(vit.blocks[-1].norm1(x))
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return tuple(t.transpose(1, 2).reshape(b, n, -1) for t in qkv)


def cls_attention(vit, images: Tensor) -> Tensor:
    """The last block's self-attention ``(B, heads, tokens, tokens)``, as DINO's get_last_selfattention returns it."""
    q, k, _ = last_block_qkv(vit, images)
    attn = vit.blocks[-1].attn
    b, n, _ = q.shape
    q, k = (t.reshape(b, n, attn.num_heads, -1).transpose(1, 2) for t in (q, k))
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


@pytest.mark.parametrize("pool", ["simpool", "token"])
def test_lost_boxes_equal_losts_code_on_the_last_blocks_keys(pool: str) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(*VIT, pool=pool, num_classes=4).eval()
    images = torch.randn(3, 3, 30, 21)  # padded to 32 x 24: a 4 x 3 grid
    vit, prefix = model.backbone.model, model.backbone.num_prefix_tokens
    assert prefix == (1 if pool == "token" else 0)
    with torch.no_grad():
        q, k, v = last_block_qkv(vit, lost_padding(images))
    for which, feats in (("k", k), ("q", q), ("v", v)):
        for k_patches in (100, 3):
            evaluator = DiscoveryEvaluator(model, methods=["lost"], which_features=which, k_patches=k_patches)
            ours = evaluator.discover(images)["lost"]
            for i in range(3):
                pred = reference.lost(feats[i : i + 1, prefix:], [4, 3], [PATCH, PATCH], (3, 30, 21), k_patches=k_patches)[0]
                assert ours[i].tolist() == pred.tolist(), (which, k_patches, i)


def test_dino_seg_boxes_equal_losts_code_on_the_cls_attention() -> None:
    torch.manual_seed(1)
    model = ImageClassifier(*VIT, pool="token", num_classes=4).eval()
    images = torch.randn(4, 3, 40, 29)  # padded to 40 x 32: a 5 x 4 grid
    with torch.no_grad():
        attn = cls_attention(model.backbone.model, lost_padding(images))
    for head in (0, 1):
        ours = DiscoveryEvaluator(model, methods=["dino_seg"], dinoseg_head=head).discover(images)["dino_seg"]
        for i in range(4):
            assert ours[i].tolist() == reference.dino_seg(attn[i : i + 1], (5, 4), PATCH, head=head)


def test_dino_seg_uses_the_pools_attention_averaged_over_heads() -> None:
    torch.manual_seed(2)
    model = ImageClassifier(*VIT, pool="simpool", pool_kwargs={"num_heads": 2}, num_classes=4).eval()
    images = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        attn = model.backbone.forward_with_attention(images)[1]  # (B, 2, 4, 3), SimPool's maps
    evaluator = DiscoveryEvaluator(model, methods=["dino_seg"])
    ours = evaluator.discover(images)["dino_seg"]
    for i in range(2):
        mean = attn[i].mean(0)
        cls_row = torch.zeros(1, 1, 13, 13)
        cls_row[0, 0, 0, 1:] = mean.flatten()
        assert ours[i].tolist() == reference.dino_seg(cls_row, (4, 3), PATCH, head=0)
    with pytest.raises(ValueError, match="dinoseg_head=2, but the pool has 2 head"):
        DiscoveryEvaluator(model, methods=["dino_seg"], dinoseg_head=2).discover(images)


def quiet_trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_corloc_on_coco20k_equals_losts_count_for_a_dino_teacher(tmp_path: Path) -> None:
    torch.manual_seed(3)
    dino = DINO(*VIT, pool="simpool", out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8)
    with torch.no_grad():  # student and teacher differ, as after training
        for p in dino.student.parameters():
            p.mul_(-3.0)
    path = save_lightning_checkpoint(dino, tmp_path / "dino.ckpt")
    file_list = make_coco(tmp_path)
    data = COCO20kDataModule(str(tmp_path), file_list=str(file_list), image_size=None, batch_size=1)
    evaluator = DiscoveryEvaluator(
        "simpool_lightning.models.DINO", checkpoint=str(path), methods=["lost", "dino_seg", "attention_mass"]
    )
    metrics = quiet_trainer().test(evaluator, data, verbose=False)[0]
    assert set(metrics) == {"test/corloc_lost", "test/corloc_dino_seg", "test/corloc_attention_mass"}

    # LOST's loop over the same images, on the teacher's last-block keys, and the existing CorLoc on its maps.
    teacher = dino.eval().teacher.backbone
    hits, mass = [], CorLoc()
    with torch.no_grad():
        for batch in data.test_dataloader():
            image, gt = batch["image"], batch["boxes"][0]
            _, k, _ = last_block_qkv(teacher.model, lost_padding(image))
            h, w = image.shape[-2:]
            pred = reference.lost(k, [-(-h // PATCH), -(-w // PATCH)], [PATCH, PATCH], (3, h, w))[0]
            hits.append(reference.is_hit(pred, gt.numpy().astype(np.int64)))
            mass.update(dino.attention_maps(image, size=(h, w)), batch["boxes"])
    assert len(hits) == 3  # image 30 (crowds only) is not scored
    assert metrics["test/corloc_lost"] == pytest.approx(sum(hits) / 3)
    assert metrics["test/corloc_attention_mass"] == pytest.approx(float(mass.compute()))


def test_refusals_name_the_problem() -> None:
    vit = ImageClassifier(*VIT, pool="simpool", num_classes=4)
    with pytest.raises(ValueError, match="methods must be distinct names from"):
        DiscoveryEvaluator(vit, methods=["lost", "tokencut"])
    with pytest.raises(ValueError, match="which_features"):
        DiscoveryEvaluator(vit, which_features="x")
    resnet = ImageClassifier("resnet18", pool="simpool", num_classes=4)
    with pytest.raises(ValueError, match=r"reads the keys of a ViT's last block .*ResNet has none"):
        DiscoveryEvaluator(resnet, methods=["lost"])
    avg = ImageClassifier(*VIT, pool="avg", num_classes=4)
    with pytest.raises(ValueError, match="the pool 'avg' has none"):
        DiscoveryEvaluator(avg, methods=["lost", "dino_seg"])
    # LOST reads keys, not the pool's attention: any pool will do (and one name is a list of one).
    assert DiscoveryEvaluator(avg, methods="lost").discover(torch.randn(1, 3, 32, 32))["lost"].shape == (1, 4)
    with pytest.raises(ValueError, match="needs batches with 'boxes'"):
        DiscoveryEvaluator(vit)._step({"image": torch.randn(1, 3, 32, 32)}, 0)


def colour_keyed_vit() -> ImageClassifier:
    """A one-block ViT (4 x 4 patches, 4 channels) whose last-block keys are LayerNorm(mean colour of the patch, 0):
    a pure red patch has the key LN(1, 0, 0, 0), a green one LN(0, 1, 0, 0)."""
    model = ImageClassifier("vit_tiny_patch16_224", dict(img_size=(12, 16), patch_size=4, embed_dim=4, depth=1, num_heads=1),
                            pool="simpool", num_classes=2).eval()  # fmt: skip
    vit = model.backbone.model
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        for c in range(3):
            vit.patch_embed.proj.weight[c, c] = 1 / 16  # the patch's mean of colour channel c
        vit.patch_embed.proj.bias.zero_()
        vit.pos_embed.zero_()
        qkv = vit.blocks[-1].attn.qkv
        qkv.weight.zero_()
        qkv.weight[4:8] = torch.eye(4)  # keys = the block's normalised input
        qkv.bias.zero_()
    return model


def test_lost_on_a_fabricated_image_by_hand() -> None:
    # A 12 x 16 image of 3 x 4 patches, green but for red patches 2, 6, 7 (an object: (0, 2), (1, 2), (1, 3))
    # and 8 (a look-alike at (2, 0), not touching it):
    #    g g R g
    #    g g R R
    #    R g g g
    red = [2, 6, 7, 8]
    image = torch.zeros(1, 3, 12, 16)
    for p in range(12):
        r, c = divmod(p, 4)
        image[0, 0 if p in red else 1, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 1.0
    # Keys LN(e_i) = (e_i - 1/4) / sigma: key . key = (1 - 1/4) / sigma^2 > 0 within a colour and
    # (0 - 1/4) / sigma^2 < 0 across. Degrees: red 3, green 7; the seed is the first red patch, 2.
    # Expansion: the reds, M > 0 exactly on them; the seed's 4-connected component is {2, 6, 7} (8 is
    # apart): patch columns 2..3, rows 0..1, so the box (8, 0, 16, 8) in pixels.
    evaluator = DiscoveryEvaluator(colour_keyed_vit(), methods=["lost"])
    assert evaluator.discover(image)["lost"].tolist() == [[8.0, 0.0, 16.0, 8.0]]
    # k_patches = 1 expands over the seed alone: A[2] is positive on the same patches, the same box.
    assert DiscoveryEvaluator(colour_keyed_vit(), methods=["lost"], k_patches=1).discover(image)["lost"].tolist() == [[8.0, 0.0, 16.0, 8.0]]
    # One object box found at IoU 1, one missed (the look-alike's box only): CorLoc 1 / 2.
    batch = {"image": image.repeat(2, 1, 1, 1), "boxes": [torch.tensor([[8.0, 0.0, 16.0, 8.0]]), torch.tensor([[0.0, 8.0, 4.0, 12.0]])]}
    evaluator._step(batch, 0)
    assert evaluator.corloc["lost"].compute().item() == 0.5
