"""Efficient-VDVAE's network (`model.vae.network=efficient`): its presets against a parameter count
taken from its own configs and layer definitions, its skip pairing, the `RrN` grammar, and a tiny
model that trains, samples and gives the KL of torch.distributions."""

import math

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import TINY_VAE, compose_config, random_batch
from vdvae import VAE
from vdvae.model.blocks import parse_block_string
from vdvae.model.vae import mirrored_skips

# Efficient-VDVAE's configs (egs/*.cfg of its code), as it writes them.
CIFAR10_BASELINE = dict(
    channels=3,
    target_res=32,
    input_conv_filters=384,
    num_output_mixtures=10,
    up_strides=[1] * 11 + [2] + [1] * 6 + [2] + [1] * 6 + [2] + [1] * 3 + [4] + [1] * 3,
    up_n_blocks_per_res=[0] * 33,
    up_filters=[384] * 33,
    up_mid_filters_ratio=[0.25] * 33,
    up_kernel_size=[3] * 30 + [1] * 3,
    up_skip_filters=[384] * 33,
    down_strides=[1] * 3 + [4] + [1] * 3 + [2] + [1] * 6 + [2] + [1] * 6 + [2] + [1] * 11,
    down_n_blocks_per_res=[0] * 15 + [4] + [0] * 6 + [10] + [0] * 10,
    down_filters=[384] * 33,
    down_mid_filters_ratio=[0.25] * 33,
    down_kernel_size=[1] * 3 + [3] * 30,
    down_latent_variates=[32] * 33,
)
IMAGENET32_BASELINE = dict(
    channels=3,
    target_res=32,
    input_conv_filters=512,
    num_output_mixtures=10,
    up_strides=[1] * 15 + [2] + [1] * 9 + [2] + [1] * 8 + [2] + [1] * 6 + [4] + [1] * 6,
    up_n_blocks_per_res=[0] * 48,
    up_filters=[512] * 48,
    up_mid_filters_ratio=[0.25] * 48,
    up_kernel_size=[3] * 42 + [1] * 6,
    up_skip_filters=[512] * 48,
    down_strides=[1] * 6 + [4] + [1] * 6 + [2] + [1] * 8 + [2] + [1] * 9 + [2] + [1] * 15,
    down_n_blocks_per_res=[0] * 6 + [0] + [0] * 6 + [10] + [0] * 8 + [15] + [0] * 9 + [0] + [0] * 15,
    down_filters=[512] * 48,
    down_mid_filters_ratio=[0.25] * 48,
    down_kernel_size=[1] * 6 + [3] * 42,
    down_latent_variates=[32] * 48,
)


def cell(c_in, ratio, kernel, out_ratio=1.0, n_layers=2):
    """Its ResidualConvCell with use_1x1_conv: 1x1 in, n_layers kxk, 1x1 out, all with biases."""
    mid, out = int(c_in * ratio), int(c_in * out_ratio)
    return c_in * mid + mid + n_layers * (mid * mid * kernel * kernel + mid) + mid * out + out


def efficient_vdvae_parameters(c):
    """The parameter count of Efficient-VDVAE's model for config `c`, layer by layer as its code builds it
    (after the dummy forward that creates the unpooling's scale_bias)."""
    total = c["channels"] * c["input_conv_filters"] + c["input_conv_filters"]  # 1x1 input conv
    widths_in = [c["input_conv_filters"]] + c["up_filters"][:-1]
    for i, stride in enumerate(c["up_strides"]):
        c_in, out, skip = widths_in[i], c["up_filters"][i], c["up_skip_filters"][i]
        total += (1 + c["up_n_blocks_per_res"][i]) * cell(c_in, c["up_mid_filters_ratio"][i], c["up_kernel_size"][i])
        total += c_in * skip + skip  # skip projection
        if stride > 1:
            total += c_in * out * stride * stride + out  # pooling conv
    res = c["target_res"] // math.prod(c["up_strides"])
    total += c["down_filters"][0] * res * res  # trainable_h
    widths_in = [c["down_filters"][0]] + c["down_filters"][:-1]
    skips = c["up_skip_filters"][::-1]
    for i, stride in enumerate(c["down_strides"]):
        f, r, k, z = (
            c[key][i] for key in ("down_filters", "down_mid_filters_ratio", "down_kernel_size", "down_latent_variates")
        )
        c_in = widths_in[i]
        if stride > 1:
            res *= stride
            total += c_in * f + f + f * res * res  # unpooling 1x1 conv and scale_bias
            c_in = f
        block = (
            cell(c_in, r, k)  # residual block
            + cell(c_in + skips[i], r * 0.5, k, out_ratio=0.5)  # posterior
            + cell(c_in, r, k, out_ratio=2.0)  # prior
            + 2 * (c_in * 2 * z + 2 * z)  # prior and posterior latent layers
            + z * f
            + f  # z projection
        )
        total += (1 + c["down_n_blocks_per_res"][i]) * block
    outputs = c["num_output_mixtures"] * (3 * c["channels"] + 1)
    return total + c["down_filters"][-1] * outputs + outputs


def efficient_vdvae_skip_pairs(c):
    """For each latent group, the bottom-up entry whose skip it reads, as its TopDown does."""
    n_up = len(c["up_strides"])
    return [n_up - 1 - i for i, extra in enumerate(c["down_n_blocks_per_res"]) for _ in range(1 + extra)]


def preset(name, data):
    cfg = compose_config(f"model={name}", f"data={data}", config_name="train")
    with torch.device("meta"):
        return cfg, instantiate(cfg.model).vae


@pytest.mark.parametrize(
    "name, data, config, expected",
    [
        ("efficient_cifar10", "cifar10", CIFAR10_BASELINE, 56_598_692),  # its train.py prints "56.599m"
        ("efficient_imagenet32", "imagenet32", IMAGENET32_BASELINE, 145_068_388),
    ],
)
def test_presets_have_efficient_vdvaes_parameter_counts_and_skip_pairs(name, data, config, expected):
    cfg, model = preset(name, data)
    n = sum(p.numel() for p in model.parameters())
    assert n == efficient_vdvae_parameters(config)
    assert expected is None or n == expected
    assert model.n_groups == len(config["down_strides"]) + sum(config["down_n_blocks_per_res"])
    enc = parse_block_string(cfg.model.vae.enc_blocks, "encoder")
    dec = parse_block_string(cfg.model.vae.dec_blocks, "decoder")
    assert mirrored_skips(enc, dec) == efficient_vdvae_skip_pairs(config)
    assert [b.skip_key for b in model.decoder.blocks] == efficient_vdvae_skip_pairs(config)


def test_paper_presets_keep_the_paper_network():
    cfg, model = preset("cifar10", "cifar10")
    assert cfg.model.vae.network == "vdvae" and cfg.model.vae.activation == "gelu"
    assert model.decoder.out_gain is not None and not hasattr(model.encoder, "skips")


TINY_EFFICIENT = dict(
    TINY_VAE,
    dec_blocks="1x1,4m1,4r1,4x1,8m4,8x1",
    no_bias_above=1,
    std="softplus",
    mixture_std="softplus",
    activation="silu",
    network="efficient",
)


def test_rr_blocks_reuse_the_skip_before_them_and_bad_pairings_are_refused():
    enc = parse_block_string("8x1,8d2,4x1,4d4,1x1", "encoder")
    assert mirrored_skips(enc, parse_block_string("1x1,4m1,4r1,4x1,8m4,8x1", "decoder")) == [4, 3, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="at resolution 4 the encoder has 2 blocks but the decoder 1"):
        VAE(**{**TINY_EFFICIENT, "dec_blocks": "1x1,4m1,4r2,8m4,8x1"})
    with pytest.raises(ValueError, match="no block at 8 before it"):
        VAE(**{**TINY_EFFICIENT, "dec_blocks": "1x1,4m1,4x1,8r1,8m4,8x1"})
    with pytest.raises(ValueError, match="network must be"):
        VAE(**{**TINY_EFFICIENT, "network": "nvae"})
    with pytest.raises(ValueError, match="activation must be one of"):
        VAE(**{**TINY_EFFICIENT, "activation": "relu"})


def test_tiny_efficient_model_gives_the_kl_of_torch_distributions_and_samples():
    torch.manual_seed(0)
    model = VAE(**TINY_EFFICIENT)
    x, target = random_batch(model)
    activations = model.encoder(model._check_input(x))
    assert sorted(activations) == list(range(5))  # one skip per encoder block
    _, groups = model.decoder(x.shape[0], activations)
    for g in groups:
        (qm, qs), (pm, ps) = g.posterior, g.prior
        expected = torch.distributions.kl_divergence(
            torch.distributions.Normal(qm, qs.exp()), torch.distributions.Normal(pm, ps.exp())
        )
        torch.testing.assert_close(g.kl, expected, rtol=1e-4, atol=1e-5)
    out = model(x, target)
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all() and (out.kl >= 0).all()
    unpool = model.decoder.unpools["1"]  # the 4m1 block's learned unpooling gets a gradient
    assert unpool.scale_bias.grad is not None and unpool.scale_bias.grad.abs().sum() > 0
    assert model.sample(3, temperature=0.8).shape == (3, 1, 8, 8)
