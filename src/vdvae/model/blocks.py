"""Building blocks of the VDVAE network: the bottleneck residual block, the block-string grammar
and per-resolution widths (Child 2020, arXiv 2011.10650, section 3 and appendix), and the learned
resolution changes of Efficient-VDVAE (Hazami et al. 2022).

Block strings describe a network as comma-separated tokens:
    RxN   N blocks at resolution R
    RdK   (encoder) one block at R, then pool by K
    RmS   (decoder) one block at R whose input adds the upsampled decoder state of resolution S
    RrN   (decoder) N blocks at R that read the same encoder skip as the block before them; only
          per-block skips (network "efficient") tell them from RxN
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vdvae.config import wanted_value

_TOKEN = re.compile(r"^(\d+)(?:([xdmr])(\d+))?$")


@dataclass(frozen=True)
class BlockSpec:
    """One block of a block string: its resolution and, for `d`/`m` tokens, the pool/mixin factor."""

    resolution: int
    down_rate: int | None = None
    mixin: int | None = None
    reuses_skip: bool = False


# Far deeper than any preset (the deepest has a few hundred blocks): a longer string is a mistake or hostile.
MAX_BLOCKS = 10_000


def parse_block_string(blocks: str, kind: str) -> list[BlockSpec]:
    """Expand a block string into one BlockSpec per block; `kind` is "encoder" or "decoder"."""
    allowed = {"encoder": "xd", "decoder": "xmr"}[kind]
    if not isinstance(blocks, str) or not blocks.strip():
        raise ValueError(f"{kind} block string is empty; expected tokens like '32x2,32d2,16x1'")
    specs = []
    for token in blocks.replace(" ", "").split(","):
        match = _TOKEN.match(token)
        if match is None:
            raise ValueError(
                f"{kind} block string {blocks!r}: malformed token {token!r}; "
                f"expected R, RxN{', RdK' if kind == 'encoder' else ', RmS, RrN'} with integers R, N, K, S"
            )
        res, op, arg = int(match[1]), match[2], match[3] and int(match[3])
        if op is not None and op not in allowed:
            raise ValueError(
                f"{kind} block string {blocks!r}: token {token!r} uses '{op}', "
                f"which only the {'encoder' if op == 'd' else 'decoder'} accepts"
            )
        if res < 1 or (arg is not None and arg < 1):
            raise ValueError(f"{kind} block string {blocks!r}: token {token!r} needs positive integers")
        if arg is not None and arg > MAX_BLOCKS:
            raise ValueError(f"{kind} block string names more than {MAX_BLOCKS:,} blocks: no model here is that deep")
        if op == "x":
            specs += [BlockSpec(res)] * arg
        elif op == "d":
            specs.append(BlockSpec(res, down_rate=arg))
        elif op == "m":
            specs.append(BlockSpec(res, mixin=arg))
        elif op == "r":
            specs += [BlockSpec(res, reuses_skip=True)] * arg
        else:
            specs.append(BlockSpec(res))
        if len(specs) > MAX_BLOCKS:
            raise ValueError(f"{kind} block string names more than {MAX_BLOCKS:,} blocks: no model here is that deep")
    return specs


def widths_by_resolution(width: int, custom: str | Mapping | None, resolutions) -> dict[int, int]:
    """Channel width at each of `resolutions`: `width` unless `custom` ("512:32,256:64" or {512: 32}) says
    otherwise."""
    if wanted_value(width, "int", 1) is not None:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if isinstance(custom, str):
        try:
            pairs = [item.split(":") for item in custom.replace(" ", "").split(",")]
            custom = {int(res): int(w) for res, w in pairs}
        except ValueError:
            raise ValueError(f"custom widths {custom!r} must look like '512:32,256:64' (resolution:width)") from None
    widths = dict.fromkeys(resolutions, width)
    for res, w in dict(custom or {}).items():
        if int(w) < 1:
            raise ValueError(f"custom widths: width at resolution {res} must be positive, got {w}")
        widths[int(res)] = int(w)
    return widths


def conv(in_ch: int, out_ch: int, kernel: int, zero_weights: bool = False) -> nn.Conv2d:
    """A same-padded convolution with PyTorch's default weight init and a zero bias."""
    layer = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
    nn.init.zeros_(layer.bias)
    if zero_weights:
        nn.init.zeros_(layer.weight)
    return layer


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


def activation_fn(name: str):
    """The network's nonlinearity: "gelu" (the paper's) or "silu" (Efficient-VDVAE's, ~2x cheaper on CPUs)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class ResBlock(nn.Module):
    """act -> 1x1 -> act -> 3x3 -> act -> 3x3 -> act -> 1x1, no normalization (act: GELU or SiLU).

    `residual` adds the input back; `down_rate` average-pools after that. Below 3x3 patches
    (resolution <= 2) the middle convs are 1x1, since a 3x3 kernel would only see padding.
    """

    def __init__(
        self, in_ch, mid_ch, out_ch, resolution, residual=True, down_rate=None, zero_last=False, activation="gelu"
    ):
        super().__init__()
        k = 3 if resolution > 2 else 1
        self.act = activation_fn(activation)
        self.conv_in = conv(in_ch, mid_ch, 1)
        self.conv_mid1 = conv(mid_ch, mid_ch, k)
        self.conv_mid2 = conv(mid_ch, mid_ch, k)
        self.conv_out = conv(mid_ch, out_ch, 1, zero_weights=zero_last)
        self.residual = residual
        self.down_rate = down_rate

    def forward(self, x, act_x=None):
        """`act_x`: the activation of x when the caller already has it (blocks that read one input share it)."""
        act = self.act
        h = self.conv_in(act(x) if act_x is None else act_x)
        h = self.conv_mid1(act(h))
        h = self.conv_mid2(act(h))
        h = self.conv_out(act(h))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, self.down_rate)
        return out

    def scale_last(self, factor: float):
        """Scale the last conv's weights: keeps the residual stream's variance bounded with depth."""
        with torch.no_grad():
            self.conv_out.weight.mul_(factor)


class StridedPool(nn.Sequential):
    """Efficient-VDVAE's learned downsampling: a KxK conv with stride K, then LeakyReLU(0.1)."""

    def __init__(self, in_ch, out_ch, factor):
        super().__init__(nn.Conv2d(in_ch, out_ch, factor, stride=factor), nn.LeakyReLU(0.1))


class LearnedUnpool(nn.Module):
    """Efficient-VDVAE's learned upsampling from resolution R/K to R: a 1x1 conv, LeakyReLU(0.1),
    nearest-neighbour upsampling by K, plus a learned per-position bias (zero at first)."""

    def __init__(self, in_ch, out_ch, resolution, factor):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)
        self.factor = factor
        self.scale_bias = nn.Parameter(torch.zeros(1, out_ch, resolution, resolution))

    def forward(self, x):
        x = F.leaky_relu(self.conv(x), 0.1)
        return F.interpolate(x, scale_factor=self.factor, mode="nearest") + self.scale_bias


def bottleneck(width: int, ratio: float) -> int:
    mid = int(width * ratio)
    if mid < 1:
        raise ValueError(f"bottleneck ratio {ratio} leaves no channels at width {width}; raise one of them")
    return mid


def depth_scale(n_blocks: int) -> float:
    return math.sqrt(1.0 / n_blocks)
