"""SimPool against the official formula, timm's SimPool, and the contract of DESIGN.md."""
from __future__ import annotations

import functools

import pytest
import torch
from timm.layers import SimPool1d, SimPool2d
from torch import nn

from simpool_lightning.pooling import SimPool, create_pool
from simpool_lightning.pooling.simpool_mean import _layer_norm_logits, simpool_mean
from simpool_lightning.pooling.simpool_power import simpool_power
from tests.reference.official_simpool import OfficialSimPool

DIM = 32


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affine and beta, so that every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("norm_patches") or name == "beta":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def _pair(num_heads: int = 1, gamma=None, use_beta: bool = False, qkv_bias: bool = False, **kw):
    torch.manual_seed(0)
    ref = OfficialSimPool(DIM, num_heads, qkv_bias=qkv_bias, gamma=gamma, use_beta=use_beta)
    _randomise(ref)
    ours = SimPool(DIM, num_heads, qkv_bias=qkv_bias, gamma=gamma, use_beta=use_beta, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _features(layout: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, DIM, 3, 5) if layout == "maps" else (batch, 15, DIM)
    return torch.randn(shape, generator=gen) * 2 + 0.5


def _grads(module: nn.Module, x: torch.Tensor, out_weight: torch.Tensor, attn_weight: torch.Tensor, attn_of):
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    pooled, attn = attn_of(module, x)
    ((pooled * out_weight).sum() + (attn.reshape(attn_weight.shape) * attn_weight).sum()).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}
    return pooled.detach(), attn.detach(), x.grad, grads


GAMMA_CASES = [(None, False), (1.25, False), (1.25, True), (2.0, False), (2.0, True)]


@pytest.mark.parametrize("layout", ["maps", "tokens"])
@pytest.mark.parametrize("gamma,use_beta", GAMMA_CASES)
@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_equals_official_formula_in_batch_mode(layout, gamma, use_beta, num_heads, qkv_bias):
    ref, ours = _pair(num_heads, gamma, use_beta, qkv_bias, min_mode="batch")
    x = _features(layout)
    b = x.shape[0]
    n = x.shape[2] * x.shape[3] if layout == "maps" else x.shape[1]
    gen = torch.Generator().manual_seed(2)
    out_w = torch.randn(b, DIM, generator=gen)
    attn_w = torch.randn(b, num_heads, n, generator=gen)
    r = _grads(ref, x, out_w, attn_w, lambda m, t: m(t))
    o = _grads(ours, x, out_w, attn_w, lambda m, t: m.forward_with_attention(t))
    torch.testing.assert_close(o[0], r[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o[1].reshape(r[1].shape), r[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[2], r[2], rtol=1e-4, atol=1e-5)
    for name, grad in r[3].items():
        torch.testing.assert_close(o[3][name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gamma", [None, 1.25, 2.0])
def test_sample_mode_does_not_depend_on_batch_mates(gamma):
    _, ours = _pair(gamma=gamma)
    x = _features("tokens", batch=5)
    together = ours(x)
    for i in range(5):
        torch.testing.assert_close(ours(x[i : i + 1]), together[i : i + 1], rtol=1e-5, atol=1e-5)
    # ... and equals the official output at batch size 1.
    ref, _ = _pair(gamma=gamma)
    for i in range(5):
        torch.testing.assert_close(ours(x[i : i + 1]), ref(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)


def test_batch_mode_depends_on_batch_mates_as_the_official_code():
    _, ours = _pair(gamma=1.25, min_mode="batch")
    x = _features("tokens", batch=3)
    values = ours.norm_patches(x)
    high = values.amin((1, 2)).argmax()  # its own minimum is not the batch's
    assert not torch.allclose(ours(x)[high], ours(x[high : high + 1])[0], atol=1e-4)


@pytest.mark.parametrize("gamma", [None, 1.25, 2.0])
@pytest.mark.parametrize("layout", ["maps", "tokens"])
@pytest.mark.parametrize("num_heads", [1, 4])
def test_channel_mode_matches_timm(gamma, layout, num_heads):
    ours = SimPool(DIM, num_heads, gamma=gamma, min_mode="channel")
    _randomise(ours)
    norm = functools.partial(nn.LayerNorm, eps=1e-6)  # timm defaults to 1e-5, SimPool to 1e-6
    cls = SimPool2d if layout == "maps" else SimPool1d
    theirs = cls(DIM, num_heads=num_heads, gamma=gamma, norm_layer=norm)
    rename = {"norm_patches": "norm", "wq": "q", "wk": "k"}
    theirs.load_state_dict({rename[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in ours.state_dict().items()})
    x = _features(layout)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["maps", "tokens"])
@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_contract_and_pooled_is_attention_weighted_values(layout, num_heads):
    ours = SimPool(DIM, num_heads)
    _randomise(ours)
    x = _features(layout)
    pooled, attn = ours.forward_with_attention(x)
    b = x.shape[0]
    expected_shape = (b, num_heads, *x.shape[2:]) if layout == "maps" else (b, num_heads, x.shape[1])
    assert attn.shape == expected_shape
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.flatten(2).sum(-1), torch.ones(b, num_heads))
    tokens = x.flatten(2).transpose(1, 2) if layout == "maps" else x
    values = ours.norm_patches(tokens).view(b, -1, num_heads, DIM // num_heads)
    weighted = torch.einsum("bhn,bnhc->bhc", attn.flatten(2), values).reshape(b, DIM)
    torch.testing.assert_close(pooled, weighted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [None, 1.25])
def test_batch_size_one_keeps_the_batch_dimension(gamma):
    out, attn = SimPool(DIM, gamma=gamma).forward_with_attention(torch.randn(1, DIM, 1, 1))
    assert out.shape == (1, DIM) and attn.shape == (1, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [None, 1.25, 3.0])
def test_low_precision_and_autocast_stay_finite_for_large_features(dtype, gamma):
    pool = SimPool(DIM, gamma=gamma)
    x = (torch.randn(3, 10, DIM) * 1e4).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out, attn = pool.forward_with_attention(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(attn).all() and torch.isfinite(x.grad).all()
    half = pool.to(dtype)
    out = half(x.detach().to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_under_autocast_matches_fp32():
    pool = SimPool(DIM, gamma=1.25)
    x = _features("tokens")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pool(x.bfloat16())
    torch.testing.assert_close(low.float(), pool(x), rtol=0.05, atol=0.05)


def test_official_state_dict_loads_unchanged():
    ref = OfficialSimPool(DIM, gamma=1.25, use_beta=True)
    ours = SimPool(DIM, gamma=1.25, use_beta=True)
    assert set(ours.state_dict()) == set(ref.state_dict()) == {
        "norm_patches.weight", "norm_patches.bias", "wq.weight", "wk.weight", "beta"
    }
    ours.load_state_dict(ref.state_dict())


def test_gradients_reach_every_parameter():
    pool = SimPool(DIM, gamma=1.25, use_beta=True, qkv_bias=True)
    pool(_features("maps")).square().sum().backward()
    missing = [n for n, p in pool.named_parameters() if n != "wk.bias" and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing  # wk.bias cancels in the softmax, as in the official module


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=30, num_heads=4), r"dim \(30\) must be divisible by num_heads \(4\)"),
        (dict(dim=32, gamma=0.0), "gamma must be > 0"),
        (dict(dim=32, gamma=-1.0), "gamma must be > 0"),
        (dict(dim=32, use_beta=True), "use_beta=True needs a gamma"),
        (dict(dim=32, min_mode="global"), "min_mode must be"),
        (dict(dim=32, gamma=1.25, eps=0.0), r"eps must be > 0 with a gamma"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_pool("simpool", **kwargs)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 16, 4, 4), r"expected maps of shape \(B, 32, H, W\), got \(2, 16, 4, 4\)"),
        ((2, 9, 16), r"expected tokens of shape \(B, N, 32\), got \(2, 9, 16\)"),
        ((2, 32), r"got a 2-d tensor of shape \(2, 32\)"),
    ],
)
def test_bad_input_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        SimPool(DIM)(torch.randn(shape))


def test_unknown_pool_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown pool 'simpoool'; known pools: .*simpool"):
        create_pool("simpoool", DIM)


def _formula(x, w, b, wq, wk, bq, num_heads, scale, gamma, min_mode, eps=0.1):
    """SimPool written as the paper's formulas, differentiated by autograd."""
    bsz, n, d = x.shape
    hd = d // num_heads
    z = nn.functional.layer_norm(x, (d,), w, b, 1e-6)
    q = nn.functional.linear(x.mean(1), wq, bq).view(bsz, num_heads, hd)
    k = nn.functional.linear(z, wk).view(bsz, n, num_heads, hd)
    attn = (torch.einsum("bhc,bnhc->bhn", q, k) * scale).softmax(-1)
    if gamma is None:
        values = z
    else:
        minimum = {
            "batch": lambda v: v.amin(),
            "sample": lambda v: v.amin(dim=(1, 2), keepdim=True),
            "channel": lambda v: v.amin(dim=1, keepdim=True),
        }[min_mode](z)
        values = (z - minimum + eps).pow(gamma)
    pooled = torch.einsum("bhn,bnhc->bhc", attn, values.view(bsz, n, num_heads, hd)).reshape(bsz, d)
    return (pooled if gamma is None else pooled.pow(1.0 / gamma)), attn


def _fused(x, w, b, wq, wk, bq, num_heads, scale, gamma, min_mode, eps=0.1):
    if gamma is None:
        return simpool_mean(x, w, b, wq, wk, bq, num_heads, scale, 1e-6)
    return simpool_power(x, w, b, wq, wk, bq, num_heads, scale, 1e-6, gamma, min_mode, eps)


def _inputs(layout, qkv_bias, b=2, n=5, d=6, offset=0.0, dtype=torch.double):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, n, d, generator=gen, dtype=dtype) + offset
    if layout == "maps":  # channels outermost in memory, as to_tokens views maps
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    params = [torch.randn(d, generator=gen, dtype=dtype) * 0.5 + 1.0, torch.randn(d, generator=gen, dtype=dtype) * 0.5]
    params += [torch.randn(d, d, generator=gen, dtype=dtype) * 0.5 for _ in range(2)]
    params.append(torch.randn(d, generator=gen, dtype=dtype) if qkv_bias else None)
    return [x.requires_grad_()] + [p.requires_grad_() if p is not None else None for p in params]


FUSED_CASES = [(None, "sample")] + [(g, m) for g in (0.5, 1.25, 2.0, 3.0) for m in ("batch", "sample", "channel")]


@pytest.mark.parametrize("gamma,min_mode", FUSED_CASES)
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("layout", ["tokens", "maps"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_functions_equal_autograd_through_the_formulas(gamma, min_mode, num_heads, layout, qkv_bias):
    inputs = _inputs(layout, qkv_bias)
    args = (num_heads, 0.7, gamma, min_mode)
    ours, expected = _fused(*inputs, *args), _formula(*inputs, *args)
    for o, e in zip(ours, expected):
        torch.testing.assert_close(o, e)
    gen = torch.Generator().manual_seed(4)
    upstream = [torch.randn(e.shape, generator=gen, dtype=e.dtype) for e in expected]
    wrt = [t for t in inputs if t is not None]
    grad_ours = torch.autograd.grad(ours, wrt, upstream)
    grad_expected = torch.autograd.grad(expected, wrt, upstream)
    for name, o, e in zip(["x", "ln_weight", "ln_bias", "wq", "wk", "bq"], grad_ours, grad_expected):
        torch.testing.assert_close(o, e, msg=lambda m: f"{name}: {m}")
    if gamma is None:  # the mean path reads maps in place and writes dX in X's layout
        assert grad_ours[0].stride() == inputs[0].stride()
    assert torch.autograd.gradcheck(lambda *t: _fused(*t, *[None] * (6 - len(t)), *args), wrt)


def test_maps_statistics_keep_the_mean_beyond_float32_resolution():
    # Locations at 30 with a spread of 1e-3: float32 holds their mean only to 1e-6 (half a unit in
    # the last place of 30; its sum adds more), 1e-3 of their spread, the same shift on every
    # channel. The maps path recovers the rest as delta, the mean of the exactly centered values
    # y = x - mu, whose sum of d terms errs by at most d eps max|y| (any summation order).
    gen = torch.Generator().manual_seed(6)
    b, n, d = 2, 49, 256
    exact = torch.randn(b, n, d, generator=gen, dtype=torch.double) * 1e-3 + 30
    x = exact.float().transpose(1, 2).contiguous().transpose(1, 2)  # maps viewed as tokens
    u = torch.randn(b, 1, d, generator=gen)
    _, mu, r, _, delta = _layer_norm_logits(x, u, torch.ones(d), torch.zeros(d), 1e-6)
    stored = x.double()  # what float32 holds; the statistics can only be exact for these values
    mean = stored.mean(-1)
    bound = d * torch.finfo(torch.float32).eps * (stored - mu.double().unsqueeze(-1)).abs().amax(-1)
    assert ((mu.double() + delta.double() - mean).abs() <= bound).all()
    assert ((mu.double() - mean).abs() > bound).any()  # float32's mean alone misses it
    std = (stored - mean.unsqueeze(-1)).square().mean(-1).add(1e-6).sqrt()
    torch.testing.assert_close(r.double(), std.reciprocal(), rtol=d * torch.finfo(torch.float32).eps, atol=0)


def _renumbered(tensors, locations, channels):
    """The same problem with locations and channels renumbered: every sum runs in another order.

    ``tensors`` are ``[x, ln_weight, ln_bias, wq, wk, upstream]``; X keeps its memory layout.
    """
    x, w, b, wq, wk, upstream = tensors
    maps = x.stride(1) == 1
    x = x[:, locations][:, :, channels]
    if maps:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return [x, w[channels], b[channels], wq[channels][:, channels], wk[channels][:, channels], upstream[:, channels]]


def _numbered_back(outputs, locations, channels):
    """``[pooled, attn, dx, dw, db, dwq, dwk]`` of a :func:`_renumbered` problem in the original numbering."""
    loc, ch = locations.argsort(), channels.argsort()
    pooled, attn, dx, dw, db, dwq, dwk = outputs
    return [pooled[:, ch], attn[..., loc], dx[:, loc][:, :, ch], dw[ch], db[ch], dwq[ch][:, ch], dwk[ch][:, ch]]


@pytest.mark.parametrize("gamma", [None, 1.25])
@pytest.mark.parametrize("offset", [0.0, 30.0])
@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_float32_is_as_exact_as_autograd_for_features_far_from_zero(gamma, offset, layout):
    """Float32 errors of the fused functions against those of autograd through the formulas.

    Locations whose mean dwarfs their spread: statistics taken as E[x^2] - mean^2 lose most digits
    there (attention error 2.9e-4 here against autograd's 2.4e-6 at offset 30).
    Both implementations are backward stable, so each one's error is a random fraction of the same
    condition-number-times-eps bound, set by which way its sums happen to round, and the order of
    those sums changes with the CPU's kernels (one maximum over one order moved 2.6x between
    ATEN_CPU_CAPABILITY=default and avx2). So each side is measured at its worst over four orders
    of the same sums (locations and channels renumbered), which estimates the bound rather than one
    draw of it. Ours must then stay within 2x of autograd's: the two round a comparable number of
    times along each path (measured: at most 1.4x under ATEN_CPU_CAPABILITY default, avx2 and
    avx512, MKL_ENABLE_INSTRUCTIONS=AVX2 and one thread, where the E[x^2] - mean^2 form is 100x),
    plus a few units of float32 roundoff (8 eps) of the output's largest value for outputs that
    autograd gets nearly exact (ln_bias's gradient, a plain sum).
    """
    gen = torch.Generator().manual_seed(5)
    b, n, d = 4, 49, 256
    inputs = _inputs(layout, False, b=b, n=n, d=d)
    with torch.no_grad():
        inputs[0].mul_(torch.rand(b, n, 1, generator=gen, dtype=torch.double) * 2).add_(offset)
    for p in inputs[3:5]:
        p.data.mul_(d**-0.5)
    upstream = torch.randn(b, d, generator=gen, dtype=torch.double)
    args = (1, d**-0.5, gamma, "sample")

    def run(fn, tensors):
        *tensors, up = [t.detach().clone().requires_grad_() for t in tensors]  # keeps strides
        pooled, attn = fn(*tensors, None, *args)
        return [pooled, attn, *torch.autograd.grad((pooled * up).sum(), tensors)]

    problem = [t.detach() for t in inputs[:5]] + [upstream]
    exact = run(_formula, problem)
    orders = [(torch.arange(n), torch.arange(d))]
    orders += [(torch.randperm(n, generator=gen), torch.randperm(d, generator=gen)) for _ in range(3)]
    worst = {_fused: [0.0] * len(exact), _formula: [0.0] * len(exact)}
    for locations, channels in orders:
        single = _renumbered([t.float() for t in problem], locations, channels)
        assert single[0].stride(1) == (1 if layout == "maps" else d)
        for fn, errors in worst.items():
            outputs = _numbered_back(run(fn, single), locations, channels)
            for i, (o, e) in enumerate(zip(outputs, exact)):
                errors[i] = max(errors[i], (o.double() - e).abs().max().item())
    names = ["pooled", "attn", "x", "ln_weight", "ln_bias", "wq", "wk"]
    for name, err_ours, err_autograd, e in zip(names, worst[_fused], worst[_formula], exact):
        bound = 2 * err_autograd + 8 * torch.finfo(torch.float32).eps * e.abs().max().item()
        assert err_ours <= bound, f"{name}: {err_ours:.2e} against autograd's {err_autograd:.2e}"
