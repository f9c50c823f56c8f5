"""The pooling zoo: the contract every registered pool keeps, then what makes each method itself."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simpool_lightning.pooling import create_pool, list_pools
from simpool_lightning.pooling.otk import sinkhorn_plan

DIM = 32
B, H, W = 3, 4, 4
N = H * W
ALL_POOLS = list_pools()
ZOO = ["gem", "lse", "how", "otk", "se", "ge", "cbam", "vit", "cait", "slot"]
# Pools that see the features as a set: permuting the locations must not change the output.
SET_POOLS = ["avg", "max", "avgmax", "catavgmax", "gem", "lse", "otk", "se", "vit", "cait", "slot", "simpool"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def maps(b: int = B) -> Tensor:
    return torch.randn(b, DIM, H, W)


def tokens(b: int = B, n: int = N) -> Tensor:
    return torch.randn(b, n, DIM)


def as_tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


def test_registry_has_the_zoo() -> None:
    assert set(ZOO) <= set(ALL_POOLS)


# ---------------------------------------------------------------- the contract, for every pool


@pytest.mark.parametrize("name", ALL_POOLS)
@pytest.mark.parametrize("kind", ["maps", "tokens"])
def test_output_and_attention_contract(name: str, kind: str) -> None:
    pool = create_pool(name, DIM)
    x = maps() if kind == "maps" else tokens()
    pooled, attn = pool.forward_with_attention(x)
    assert pooled.shape == (B, pool.out_dim)
    assert torch.isfinite(pooled).all()
    assert torch.equal(pool(x), pooled) or torch.allclose(pool(x), pooled, atol=1e-6)
    if not pool.has_attention:
        assert attn is None
        return
    locations = (H, W) if kind == "maps" else (N,)
    assert attn.dim() == 2 + len(locations) and attn.shape[0] == B and attn.shape[2:] == locations
    assert attn.shape[1] >= 1
    assert (attn >= 0).all()
    sums = attn.flatten(2).sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL_POOLS)
def test_maps_and_their_tokens_pool_alike(name: str) -> None:
    pool = create_pool(name, DIM).eval()
    x = maps()
    pooled_maps, attn_maps = pool.forward_with_attention(x)
    pooled_tokens, attn_tokens = pool.forward_with_attention(as_tokens(x))
    torch.testing.assert_close(pooled_maps, pooled_tokens)
    if attn_maps is not None:
        torch.testing.assert_close(attn_maps.flatten(2), attn_tokens)


@pytest.mark.parametrize("name", ALL_POOLS)
def test_gradients_reach_every_parameter(name: str) -> None:
    pool = create_pool(name, DIM).train()
    x = maps().requires_grad_()
    pooled, attn = pool.forward_with_attention(x)
    # Random weights: a plain sum can cancel a parameter's gradient by symmetry.
    loss = (pooled * torch.randn_like(pooled)).sum()
    if attn is not None:
        loss = loss + (attn * torch.randn_like(attn)).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for pname, param in pool.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name}: no gradient reaches {pname}"
            assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {pname}"


@pytest.mark.parametrize("name", ALL_POOLS)
def test_batch_size_one_and_batch_independence(name: str) -> None:
    pool = create_pool(name, DIM)
    for x in (maps(1), tokens(1)):
        pooled, _ = pool.train().forward_with_attention(x)
        assert pooled.shape == (1, pool.out_dim) and torch.isfinite(pooled).all()
    # In eval mode a sample's output must not depend on its batch mates.
    pool.eval()
    x = maps()
    torch.testing.assert_close(pool(x)[1:2], pool(x[1:2]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_POOLS)
def test_bf16_autocast_is_finite(name: str) -> None:
    pool = create_pool(name, DIM).train()
    x = (3 * maps()).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, attn = pool.forward_with_attention(x)
        loss = pooled.float().square().mean()
    assert torch.isfinite(pooled).all()
    if attn is not None:
        assert torch.isfinite(attn).all() and (attn >= 0).all()
        sums = attn.float().flatten(2).sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-3, rtol=0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ALL_POOLS)
def test_bf16_module_on_bf16_features(name: str) -> None:
    pool = create_pool(name, DIM).to(torch.bfloat16)
    pooled, attn = pool.forward_with_attention(maps().to(torch.bfloat16))
    assert pooled.dtype == torch.bfloat16 and torch.isfinite(pooled).all()
    if attn is not None:
        assert torch.isfinite(attn).all()


@pytest.mark.parametrize("name", ALL_POOLS)
def test_wrong_channel_count_raises(name: str) -> None:
    pool = create_pool(name, DIM)
    with pytest.raises(ValueError, match=str(DIM)):
        pool(torch.randn(B, DIM + 1, H, W))
    with pytest.raises(ValueError, match=str(DIM)):
        pool(torch.randn(B, N, DIM + 1))


@pytest.mark.parametrize("name", [name for name in SET_POOLS if name in ALL_POOLS])
def test_set_pools_are_permutation_invariant(name: str) -> None:
    pool = create_pool(name, DIM).eval()
    x = tokens()
    perm = torch.randperm(N)
    pooled, attn = pool.forward_with_attention(x)
    pooled_perm, attn_perm = pool.forward_with_attention(x[:, perm])
    torch.testing.assert_close(pooled_perm, pooled, atol=1e-5, rtol=1e-5)
    if attn is not None:
        torch.testing.assert_close(attn_perm, attn[..., perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["how", "ge", "cbam"])
def test_grid_pools_reject_non_square_tokens(name: str) -> None:
    with pytest.raises(ValueError, match="square"):
        create_pool(name, DIM)(tokens(n=12))


@pytest.mark.parametrize("name", ALL_POOLS)
def test_non_square_maps_keep_their_grid(name: str) -> None:
    pool = create_pool(name, DIM).eval()
    x = torch.randn(2, DIM, 3, 5)
    pooled, attn = pool.forward_with_attention(x)
    assert pooled.shape == (2, pool.out_dim)
    assert attn is None or attn.shape[2:] == (3, 5)
    # The grid matters: a 5 x 3 reading of the 3 x 5 tokens would smooth the wrong neighbours.
    if name == "how":  # its smoothing is symmetric, so transposing commutes with it
        pooled_t, attn_t = pool.forward_with_attention(x.transpose(2, 3).contiguous())
        torch.testing.assert_close(attn_t, attn.transpose(2, 3), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- GeM


def test_gem_interpolates_between_avg_and_max() -> None:
    x = torch.rand(B, N, DIM) * 0.9 + 0.1
    avg, mx = x.mean(1), x.amax(1)
    torch.testing.assert_close(create_pool("gem", DIM, p=1.0)(x), avg)
    gem3 = create_pool("gem", DIM, p=3.0)(x)
    assert (gem3 >= avg - 1e-6).all() and (gem3 <= mx + 1e-6).all() and (gem3 > avg + 1e-4).any()
    # One maximum among N terms bounds the power mean: max * N ** (-1/p) <= GeM <= max.
    p = 50.0
    gem = create_pool("gem", DIM, p=p)(x)
    assert (gem <= mx + 1e-6).all() and (gem >= mx * N ** (-1 / p) - 1e-6).all()


def test_gem_exponent_is_learnable_or_fixed() -> None:
    learned = create_pool("gem", DIM)
    assert [name for name, _ in learned.named_parameters()] == ["p"]
    learned(torch.rand(B, N, DIM)).sum().backward()
    assert learned.p.grad is not None and learned.p.grad != 0
    fixed = create_pool("gem", DIM, p=2.0, learnable=False)
    assert list(fixed.parameters()) == [] and "p" in fixed.state_dict()
    with pytest.raises(ValueError):
        create_pool("gem", DIM, p=0.0)


# ---------------------------------------------------------------- LSE


def test_lse_interpolates_between_avg_and_max() -> None:
    x = tokens()
    # To second order LSE is mean + r/2 variance (and the log of ~N cancels badly in float32 below).
    torch.testing.assert_close(create_pool("lse", DIM, r=1e-2)(x), x.mean(1), atol=2e-2, rtol=0)
    # LSE overshoots max by at most log(N) / r below it: max - log(N)/r <= lse <= max.
    r = 1e3
    lse = create_pool("lse", DIM, r=r)(x)
    assert (lse <= x.amax(1) + 1e-5).all() and (lse >= x.amax(1) - math.log(N) / r - 1e-5).all()
    assert "r" in dict(create_pool("lse", DIM).named_parameters())
    assert list(create_pool("lse", DIM, learnable=False).parameters()) == []


# ---------------------------------------------------------------- HOW


def _identity_how(**kwargs) -> nn.Module:
    pool = create_pool("how", DIM, **kwargs)
    with torch.no_grad():
        pool.reduction.weight.copy_(torch.eye(DIM))
        pool.reduction.bias.zero_()
    return pool


def test_how_attention_is_normalised_feature_norm() -> None:
    x = tokens()
    _, attn = create_pool("how", DIM).forward_with_attention(x)
    norms = x.norm(dim=-1)
    torch.testing.assert_close(attn, (norms / norms.sum(-1, keepdim=True)).unsqueeze(1))


def test_how_pools_smoothed_features_weighted_by_norm() -> None:
    x = maps()
    weights = x.norm(dim=1).flatten(1)  # (B, N), from the features before smoothing
    smoothed = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).flatten(2)  # (B, C, N)
    expected = F.normalize((smoothed * weights.unsqueeze(1)).sum(-1), dim=-1)
    torch.testing.assert_close(_identity_how()(x), expected)
    unsmoothed = F.normalize((x.flatten(2) * weights.unsqueeze(1)).sum(-1), dim=-1)
    torch.testing.assert_close(_identity_how(kernel_size=1)(x), unsmoothed)


def test_how_reduces_to_out_dim_unit_vectors() -> None:
    pool = create_pool("how", DIM, out_dim=8)
    pooled = pool(maps())
    assert pool.out_dim == 8 and pooled.shape == (B, 8)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(B))
    with pytest.raises(ValueError):
        create_pool("how", DIM, kernel_size=2)


# ---------------------------------------------------------------- OTK


def test_sinkhorn_plan_has_the_uniform_marginals() -> None:
    n, p = 10, 4
    plan = sinkhorn_plan(3 * torch.randn(2, n, p), iterations=200)
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.full((2, p), 1 / p))  # exact: the last step
    torch.testing.assert_close(plan.sum(2), torch.full((2, n), 1 / n), atol=1e-5, rtol=1e-3)


def test_otk_transports_every_location_equally() -> None:
    pool = create_pool("otk", DIM, num_references=4, iterations=100)
    assert pool.out_dim == 4 * DIM
    _, attn = pool.forward_with_attention(tokens())
    # attn = p * plan^T: each reference's mass sums to 1, each location sends p / N in all.
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, 4))
    torch.testing.assert_close(attn.sum(1), torch.full((B, N), 4 / N), atol=1e-4, rtol=1e-3)
    assert attn.std() > 1e-3  # not uniform: the references do pick locations


def test_otk_output_is_weighted_means_over_sqrt_p() -> None:
    pool = create_pool("otk", DIM, num_references=3)
    x = tokens()
    pooled, attn = pool.forward_with_attention(x)
    torch.testing.assert_close(pooled, torch.einsum("bpn,bnc->bpc", attn, x).flatten(1) / math.sqrt(3))


def test_otk_with_one_reference_is_gap() -> None:
    x = tokens()
    torch.testing.assert_close(create_pool("otk", DIM, num_references=1)(x), x.mean(1))


# ---------------------------------------------------------------- SE and GE


def test_se_gates_gap_per_channel() -> None:
    pool = create_pool("se", DIM)
    x = tokens()
    last = pool.excitation[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(30.0)
    torch.testing.assert_close(pool(x), x.mean(1))  # gate fully open
    with torch.no_grad():
        last.bias.fill_(-30.0)
    assert pool(x).abs().max() < 1e-9  # gate closed
    assert pool.forward_with_attention(x)[1] is None


def test_ge_with_global_extent_is_se() -> None:
    ge = create_pool("ge", DIM, extent=0, learnable_gather=False)
    se = create_pool("se", DIM)
    se.excitation.load_state_dict(ge.mlp.state_dict())
    x = maps()
    pooled, attn = ge.forward_with_attention(x)
    torch.testing.assert_close(pooled, se(x))
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / N))


def test_ge_parameter_free_gather_excites_locally() -> None:
    pool = create_pool("ge", DIM, extent=2, learnable_gather=False, use_mlp=False)
    x = maps()
    gathered = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)  # window 2e - 1, stride e
    gate = torch.sigmoid(F.interpolate(gathered, size=(H, W)))
    pooled, attn = pool.forward_with_attention(x)
    torch.testing.assert_close(pooled, (gate * x).mean((2, 3)))
    weights = gate.mean(1, keepdim=True)
    torch.testing.assert_close(attn, weights / weights.sum((2, 3), keepdim=True))
    assert list(pool.parameters()) == []


def test_ge_learnable_gather_is_strided_depthwise() -> None:
    pool = create_pool("ge", DIM, extent=4)
    convs = [m for m in pool.gather if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.groups == DIM and c.stride == (2, 2) for c in convs)
    _, attn = pool.forward_with_attention(tokens(n=64))  # 8 x 8, gathered to 2 x 2
    assert attn.std(-1).min() > 0  # the gate varies over locations
    for bad in ({"extent": 3}, {"extent": 0}):
        with pytest.raises(ValueError):
            create_pool("ge", DIM, **bad)


# ---------------------------------------------------------------- CBAM


def test_cbam_attention_is_its_spatial_gate() -> None:
    pool = create_pool("cbam", DIM)
    x = maps()
    pooled, attn = pool.forward_with_attention(x)
    assert attn.shape == (B, 1, H, W)
    t = as_tokens(x)
    refined = t * pool.channel_gate(t)
    gate = pool.spatial_gate(refined)
    torch.testing.assert_close(attn.flatten(1), gate / gate.sum(-1, keepdim=True))
    torch.testing.assert_close(pooled, (gate.unsqueeze(-1) * refined).mean(1))


def test_cbam_spatial_convolution_sees_the_grid() -> None:
    # A kernel that reads one column to the right moves a spike left by one column; a grid
    # rebuilt transposed would move it up instead.
    pool = create_pool("cbam", DIM, kernel_size=3).eval()
    with torch.no_grad():
        conv = pool.spatial[0]
        conv.weight.zero_()
        conv.weight[0, 1, 1, 2] = 10.0  # the max-over-channels descriptor, one column right
    x = torch.zeros(1, DIM, H, W)
    x[0, :, 1, 3] = 5.0
    _, attn = pool.forward_with_attention(x)
    assert attn[0, 0].argmax().item() == 1 * W + 2


# ---------------------------------------------------------------- ViT and CaiT


def test_vit_query_attention_matches_torch_multihead_attention() -> None:
    heads = 4
    pool = create_pool("vit", DIM, num_heads=heads)
    mha = nn.MultiheadAttention(DIM, heads, batch_first=True)
    attn_layer = pool.attn
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn_layer.q.weight, attn_layer.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn_layer.q.bias, attn_layer.kv.bias]))
        mha.out_proj.load_state_dict(attn_layer.proj.state_dict())
    x = tokens()
    query = pool.cls_token.expand(B, 1, DIM)
    sequence = torch.cat([query, x], dim=1)
    expected, weights = mha(query, sequence, sequence, average_attn_weights=False)  # weights (B, h, 1, 1 + N)
    pooled, attn = pool.forward_with_attention(x)
    torch.testing.assert_close(pooled, expected[:, 0])
    patches = weights[:, :, 0, 1:]
    torch.testing.assert_close(attn, patches / patches.sum(-1, keepdim=True))


def test_vit_heads_and_query_options() -> None:
    pool = create_pool("vit", DIM, num_heads=8)
    assert pool.forward_with_attention(tokens())[1].shape == (B, 8, N)
    with pytest.raises(ValueError, match=r"32.*5"):
        create_pool("vit", DIM, num_heads=5)
    with pytest.raises(ValueError, match=r"32.*5"):
        create_pool("cait", DIM, num_heads=5)
    gap = create_pool("vit", DIM, query="gap")
    assert gap.cls_token is None and gap(tokens()).shape == (B, DIM)
    with pytest.raises(ValueError):
        create_pool("vit", DIM, query="mean")


def test_vit_with_a_blind_query_attends_uniformly() -> None:
    pool = create_pool("vit", DIM)
    with torch.no_grad():
        pool.attn.q.weight.zero_()
        pool.attn.q.bias.zero_()
    _, attn = pool.forward_with_attention(tokens())
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / N))


def test_cait_blocks_refine_the_class_token_by_layerscale() -> None:
    pool = create_pool("cait", DIM, depth=3)
    assert len(pool.blocks) == 3
    x = tokens()
    with torch.no_grad():
        for block in pool.blocks:
            block.gamma_1.zero_()
            block.gamma_2.zero_()
    # With LayerScale at zero the blocks are identities: the output is LN of the class token.
    torch.testing.assert_close(pool(x), pool.norm(pool.cls_token).expand(B, -1))
    with torch.no_grad():
        for block in pool.blocks:
            block.gamma_1.fill_(1.0)
            block.gamma_2.fill_(1.0)
    pooled = pool(x)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3  # now it reads the features
    with pytest.raises(ValueError):
        create_pool("cait", DIM, depth=0)


# ---------------------------------------------------------------- Slot


def test_slot_attention_competes_over_slots() -> None:
    # The softmax runs over slots: with one slot it is constant, so the attention is uniform.
    _, attn = create_pool("slot", DIM, num_slots=1).forward_with_attention(tokens())
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / N))
    _, attn = create_pool("slot", DIM, num_slots=4).forward_with_attention(tokens())
    assert attn.shape == (B, 4, N) and attn.std(-1).min() > 1e-4


def test_slot_iterations_refine_the_slots() -> None:
    once = create_pool("slot", DIM, iterations=1)
    thrice = create_pool("slot", DIM, iterations=3)
    thrice.load_state_dict(once.state_dict())
    x = tokens()
    assert not torch.allclose(once(x), thrice(x))
    for bad in ({"iterations": 0}, {"num_slots": 0}):
        with pytest.raises(ValueError):
            create_pool("slot", DIM, **bad)
