"""Block-string grammar, per-resolution widths and construction-time errors."""

import pytest
import torch

from tests.conftest import TINY_VAE
from vdvae import VAE
from vdvae.model.blocks import BlockSpec, parse_block_string, widths_by_resolution


def test_parse_expands_tokens():
    assert parse_block_string("32x2,32d2,16", "encoder") == [
        BlockSpec(32),
        BlockSpec(32),
        BlockSpec(32, down_rate=2),
        BlockSpec(16),
    ]
    assert parse_block_string("1x1,4m1", "decoder") == [BlockSpec(1), BlockSpec(4, mixin=1)]


@pytest.mark.parametrize(
    "blocks,kind,message",
    [
        ("32y2", "encoder", "malformed token '32y2'"),
        ("32x", "encoder", "malformed token '32x'"),
        ("", "decoder", "empty"),
        ("32x2,,16x1", "encoder", "malformed token ''"),
        ("4m1", "encoder", "only the decoder"),
        ("32d2", "decoder", "only the encoder"),
        ("32x0", "encoder", "positive"),
    ],
)
def test_malformed_block_strings(blocks, kind, message):
    with pytest.raises(ValueError, match=message):
        parse_block_string(blocks, kind)


def test_widths():
    assert widths_by_resolution(16, "32:16,16:32", [32, 16, 8]) == {32: 16, 16: 32, 8: 16}
    assert widths_by_resolution(16, {4: 64}, [8, 4]) == {8: 16, 4: 64}
    with pytest.raises(ValueError, match="resolution:width"):
        widths_by_resolution(16, "32-16", [32])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(image_size=16), "encoder starts at resolution 8 but image_size is 16"),
        (dict(enc_blocks="8x1,8d3,1x1"), "not divisible by the pool factor 3"),
        (dict(enc_blocks="8x1,8d2,2x1"), "encoder block at resolution 2 follows blocks that end at 4"),
        (dict(dec_blocks="1x1,2m1,8m2"), "the encoder never reaches it"),
        (dict(dec_blocks="1x1,8m4"), "no earlier decoder block at resolution 4"),
        (dict(dec_blocks="1x1,4m1"), "decoder ends at resolution 4 but image_size is 8"),
        (dict(custom_widths="4:8"), "encoder channels can only grow"),
        (dict(custom_widths="1:8,4:16,8:16"), "width 8 at resolution 1 is below 16 at 4"),
        (dict(bottleneck_ratio=0.01), "bottleneck ratio"),
        (dict(likelihood="gauss"), "likelihood must be"),
        (dict(image_channels=2), "1 or 3 image channels"),
        (dict(no_latent_above=0), "without a latent group"),
    ],
)
def test_bad_architectures_fail_at_construction(change, message):
    with pytest.raises(ValueError, match=message):
        VAE(**{**TINY_VAE, **change})


def test_wrong_input_shape_names_expected_shape():
    model = VAE(**TINY_VAE)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
