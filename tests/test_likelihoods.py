"""The Gaussian KL against torch.distributions; the DMOL and Bernoulli pmfs by brute-force enumeration."""

import itertools

import pytest
import torch

from vdvae.model.distributions import gaussian_kl
from vdvae.model.likelihoods import Bernoulli, DiscretizedMixtureLogistics


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mq, lq, mp, lp = (torch.randn(1000, generator=gen, dtype=torch.float64) * 2 for _ in range(4))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, lq.exp()), torch.distributions.Normal(mp, lp.exp())
    )
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), ref, rtol=1e-10, atol=1e-10)
    assert gaussian_kl(mq, lq, mq, lq).abs().max() < 1e-12


def dmol_params(channels, n_mix, seed=0, size=1):
    head = DiscretizedMixtureLogistics(4, channels, n_mix)
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(1, head.out_conv.out_channels, size, size, generator=gen)
    params[:, n_mix:] *= 0.7  # means in [-1, 1]-ish, scales of a few bins to a whole range
    return params


def all_values(channels, bits):
    levels = 2**bits - 1
    grid = torch.arange(levels + 1) * 2.0 / levels - 1
    return torch.tensor(list(itertools.product(grid.tolist(), repeat=channels)))  # (V^C, C)


@pytest.mark.parametrize("channels,bits,n_mix", [(1, 8, 5), (1, 5, 3), (3, 5, 4), (1, 1, 2), (3, 3, 10)])
def test_dmol_sums_to_one(channels, bits, n_mix):
    params = dmol_params(channels, n_mix, seed=bits)
    head = DiscretizedMixtureLogistics(4, channels, n_mix, bits)
    values = all_values(channels, bits)
    log_p = head.log_prob(params.expand(len(values), -1, -1, -1), values[:, :, None, None])
    assert torch.logsumexp(log_p.double(), 0).exp().item() == pytest.approx(1.0, abs=1e-5)


def test_dmol_rgb_8bit_sums_to_one_over_every_channel():
    """All 256^3 values of one RGB pixel: the coupled channels together normalize to one."""
    head = DiscretizedMixtureLogistics(4, 3, 2, 8)
    params = dmol_params(3, 2, seed=3)
    grid = torch.arange(256) * 2.0 / 255 - 1
    gb = torch.cartesian_prod(grid, grid)  # (65536, 2)
    total = torch.zeros((), dtype=torch.float64)
    for r in grid:
        values = torch.cat([r.expand(len(gb), 1), gb], dim=1)[:, :, None, None]
        total += head.log_prob(params.expand(len(gb), -1, -1, -1), values).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def naive_dmol_prob(params, x, n_mix, bits):
    """p(x) of one RGB pixel from the definition, in float64, one component and channel at a time."""
    p = params.double().flatten()
    logits, rest = p[:n_mix], p[n_mix:].reshape(3, 3, n_mix)
    half = 1.0 / (2**bits - 1)
    weights = torch.softmax(logits, 0)
    total = 0.0
    for m in range(n_mix):
        coef = torch.tanh(rest[:, 2, m])
        means = [rest[0, 0, m], rest[1, 0, m] + coef[0] * x[0], rest[2, 0, m] + coef[1] * x[0] + coef[2] * x[1]]
        prob = weights[m]
        for c in range(3):
            s = torch.exp(rest[c, 1, m].clamp(min=-7))
            hi = 1.0 if x[c] > 1 - half else torch.sigmoid((x[c] + half - means[c]) / s)
            lo = 0.0 if x[c] < -1 + half else torch.sigmoid((x[c] - half - means[c]) / s)
            prob = prob * (hi - lo)
        total = total + prob
    return total


def test_dmol_matches_naive_definition():
    head = DiscretizedMixtureLogistics(4, 3, 3, 8)
    params = dmol_params(3, 3, seed=5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(0, 256, (3,), generator=gen) * 2.0 / 255 - 1
        x[0] = [-1.0, 1.0, x[0]][_ % 3]  # exercise both edge bins
        ours = head.log_prob(params, x[None, :, None, None]).exp().item()
        assert ours == pytest.approx(naive_dmol_prob(params, x.double(), 3, 8).item(), rel=1e-4)


def test_dmol_stable_in_the_far_tail_and_under_bf16_autocast():
    head = DiscretizedMixtureLogistics(4, 1, 1, 8)
    params = torch.tensor([0.0, -0.9, -7.0]).view(1, 3, 1, 1)  # a sharp component far from the target
    x = torch.full((1, 1, 1, 1), 0.9)
    log_p = head.log_prob(params, x)
    assert torch.isfinite(log_p).all() and log_p.item() < -100
    params = dmol_params(3, 10, size=4)
    x = (torch.randint(0, 256, (1, 3, 4, 4)) - 127.5) / 127.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p_bf16 = head_rgb_log_prob(params, x)
    assert log_p_bf16.dtype == torch.float32
    torch.testing.assert_close(log_p_bf16, head_rgb_log_prob(params, x))


def head_rgb_log_prob(params, x):
    return DiscretizedMixtureLogistics(4, 3, 10, 8).log_prob(params, x)


@pytest.mark.parametrize("channels,bits", [(1, 8), (3, 5)])
def test_dmol_samples_lie_on_the_grid(channels, bits):
    head = DiscretizedMixtureLogistics(4, channels, 4, bits)
    params = dmol_params(channels, 4, size=8)
    for mode in (False, True):
        x = head.sample(params, mode=mode)
        assert x.shape == (1, channels, 8, 8) and x.min() >= -1 and x.max() <= 1
        k = (x + 1) / 2 * (2**bits - 1)
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(head.sample(params, mode=True), head.sample(params, mode=True))


def test_dmol_sample_frequencies_match_pmf():
    head = DiscretizedMixtureLogistics(4, 1, 3, 2)  # 4 values
    params = dmol_params(1, 3, seed=2)
    values = all_values(1, 2)
    probs = head.log_prob(params.expand(4, -1, -1, -1), values[:, :, None, None]).exp()
    torch.manual_seed(0)
    draws = head.sample(params.expand(20000, -1, -1, -1)).flatten()
    freq = torch.stack([(draws - v).abs().lt(1e-4).float().mean() for v in values.flatten()])
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_bernoulli_sums_to_one():
    head = Bernoulli(4, channels=1)
    logits = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    values = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 1, 2, 2)
    log_p = head.log_prob(logits.expand(16, -1, -1, -1), values)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(values).sum(dim=(1, 2, 3))
    torch.testing.assert_close(log_p, ref)


@pytest.mark.parametrize("channels,bits", [(1, 3), (3, 2), (3, 8)])
def test_channel_pmfs_multiply_to_the_joint_pmf(channels, bits):
    """What an entropy coder uses, p(x_c | x_<c) per channel, is the mixture's joint pmf taken apart: the
    product over channels at the target is exp(log_prob), and each channel's pmf sums to one."""
    torch.manual_seed(channels + bits)
    head = DiscretizedMixtureLogistics(4, channels, n_mix=3, bits=bits)
    params = 2 * torch.randn(2, 3 * (1 + channels * head.per_channel), 3, 3)
    symbols = torch.randint(0, 2**bits, (2, channels, 3, 3))
    target = head.grid(symbols).float()
    log_p = torch.zeros(2, dtype=torch.float64)
    for c in range(channels):
        pmf = head.channel_pmf(params, target, c).view(2, 9, 2**bits)
        torch.testing.assert_close(pmf.sum(-1), torch.ones(2, 9, dtype=torch.float64))
        log_p += pmf.gather(2, symbols[:, c].reshape(2, 9, 1)).log().sum(dim=(1, 2))
    torch.testing.assert_close(log_p.float(), head.log_prob(params, target), rtol=1e-5, atol=1e-4)
    assert torch.equal(head.symbols(target), symbols)


def test_bernoulli_channel_pmf_matches_log_prob():
    head = Bernoulli(4, channels=1)
    logits = 30 * torch.randn(2, 1, 4, 4)
    target = torch.bernoulli(torch.full((2, 1, 4, 4), 0.5))
    pmf = head.channel_pmf(logits, target, 0)
    picked = pmf.gather(1, target.long().reshape(-1, 1)).view(2, 16).log().sum(1)
    torch.testing.assert_close(picked.float(), head.log_prob(logits, target))
