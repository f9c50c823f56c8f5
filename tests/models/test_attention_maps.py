"""ImageClassifier.attention_maps: shapes, normalisation, the [CLS] attention, pools without attention."""
from __future__ import annotations

import pytest
import torch

from simpool_lightning import create_pool, list_pools
from simpool_lightning.models import ImageClassifier

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)  # a 4 x 4 patch grid
ATTENTION_POOLS = [p for p in list_pools() if create_pool(p, 64).has_attention]
PLAIN_POOLS = [p for p in list_pools() if not create_pool(p, 64).has_attention]


def vit(pool: str, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(VIT, dict(VIT_KWARGS, **kwargs), pool=pool, num_classes=4).eval()


def assert_maps(maps: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert maps.shape == shape
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.flatten(-2).sum(-1), torch.ones(shape[:-2]), atol=1e-5, rtol=0)


def test_pool_lists_are_not_trivial():
    assert "simpool" in ATTENTION_POOLS and "avg" in PLAIN_POOLS


@pytest.mark.parametrize("pool", ATTENTION_POOLS + ["token"])
def test_vit_maps(pool: str):
    model = vit(pool)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(images)
        assert_maps(maps, (2, 4, 4))
        # Upsampling renormalises: still one unit of attention per image, at any size.
        assert_maps(model.attention_maps(images, size=(37, 53)), (2, 37, 53))
        per_head = model.attention_maps(images, per_head=True)
    assert per_head.dim() == 4 and per_head.shape[0] == 2 and per_head.shape[-2:] == (4, 4)
    assert_maps(per_head, tuple(per_head.shape))
    torch.testing.assert_close(per_head.mean(1), maps)


def test_vit_maps_non_square():
    """A 4 x 6 patch grid comes back as (4, 6), not transposed or flattened wrongly."""
    images = torch.randn(2, 3, 32, 48)
    for pool in ("simpool", "token"):
        with torch.no_grad():
            assert_maps(vit(pool, img_size=(32, 48)).attention_maps(images), (2, 4, 6))


@pytest.mark.parametrize("pool", ATTENTION_POOLS)
def test_cnn_maps(pool: str):
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", pool=pool, num_classes=4).eval()
    images = torch.randn(2, 3, 64, 96)  # stride 32: a 2 x 3 map
    with torch.no_grad():
        assert_maps(model.attention_maps(images), (2, 2, 3))


@pytest.mark.parametrize("heads", [1, 2])
def test_per_head_shape(heads: int):
    model = ImageClassifier(VIT, VIT_KWARGS, pool="simpool", pool_kwargs=dict(num_heads=heads), num_classes=4).eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(3, 3, 32, 32), size=(32, 32), per_head=True)
    assert_maps(maps, (3, heads, 32, 32))


def test_token_maps_equal_the_last_blocks_softmax():
    """The [CLS] row of the last block's softmax, taken from timm's own unfused attention."""
    model = vit("token")
    attn = model.backbone.model.blocks[-1].attn
    attn.fused_attn = False  # the explicit path, which materialises softmax(q k^T * scale)
    captured: list[torch.Tensor] = []
    # attn_drop is applied to the softmax output: its input is the attention matrix (B, heads, N, N).
    attn.attn_drop.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(images, per_head=True)
    assert len(captured) == 1
    cls_row = captured[0][:, :, 0, 1:]  # [CLS] query, patch keys (the [CLS] key dropped)
    expected = (cls_row / cls_row.sum(-1, keepdim=True)).unflatten(-1, (4, 4))
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pool", PLAIN_POOLS)
def test_pool_without_attention_raises_naming_it(pool: str):
    with pytest.raises(ValueError, match=f"'{pool}'"):
        vit(pool).attention_maps(torch.randn(1, 3, 32, 32))
