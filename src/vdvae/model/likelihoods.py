"""Likelihoods p(x | z): small pure functions plus the output heads that use them.

- Discretized mixture of logistics (Salimans et al. 2017, PixelCNN++), with the channel coupling
  that makes G depend on R and B on R and G, for 1 or 3 channels at any bit depth: targets lie on
  the grid 2k / (2^bits - 1) - 1 and the bins tile [-1, 1] exactly, so the pmf sums to one.
- Bernoulli for binary data (targets in {0, 1}).
Both compute in fp32 even under autocast: the loss is a sum of many small log-probabilities.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vdvae.model.blocks import conv
from vdvae.model.distributions import softplus_logstd

LOG_SCALE_MIN = -7.0  # floor on logistic log-scales, as in PixelCNN++ and VDVAE: bins stay resolvable


def _log_bin_mass(upper, lower):
    """log(sigmoid(upper) - sigmoid(lower)) for upper > lower, without cancellation.

    sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)).
    """
    return F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))


class DiscretizedMixtureLogistics(nn.Module):
    """Output head and pmf of a discretized mixture of logistics over `channels` (1 or 3) at `bits`.

    Parameter layout per pixel (the PixelCNN++/VDVAE layout): `n_mix` mixture logits, then per
    channel `n_mix` means, `n_mix` log-scales and, for RGB, `n_mix` coupling coefficients. Log-scales
    come from the head as log-scales (`std="exp"`, VDVAE's) or through softplus (`std="softplus"`,
    Efficient-VDVAE's: scale = softplus(ln2 l) / ln2), and are floored at `min_log_scale` (-7 as in
    VDVAE; Efficient-VDVAE's -250 leaves them free).
    """

    def __init__(
        self, width: int, channels: int = 3, n_mix: int = 10, bits: int = 8, min_log_scale=LOG_SCALE_MIN, std="exp"
    ):
        super().__init__()
        if std not in ("exp", "softplus"):
            raise ValueError(
                f"the mixture's std must be 'exp' (VDVAE's) or 'softplus' (Efficient-VDVAE's), got {std!r}"
            )
        self.softplus_std = std == "softplus"
        if channels not in (1, 3):
            raise ValueError(f"the mixture-of-logistics likelihood supports 1 or 3 image channels, got {channels}")
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be between 1 and 16, got {bits}")
        if n_mix < 1:
            raise ValueError(f"num_mixtures must be at least 1, got {n_mix}")
        self.channels, self.n_mix, self.bits, self.min_log_scale = channels, n_mix, bits, min_log_scale
        self.per_channel = 3 if channels == 3 else 2  # means, log-scales (and coefficients for RGB)
        self.out_conv = conv(width, n_mix * (1 + channels * self.per_channel), 1)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def forward(self, h):
        return self.out_conv(h)

    def _split(self, params):
        """(N, P, H, W) head output -> logits (N, M, H, W), means/log-scales/coeffs (N, C, M, H, W)."""
        n, _, h, w = params.shape
        m, c = self.n_mix, self.channels
        logits = params[:, :m]
        rest = params[:, m:].reshape(n, c, self.per_channel, m, h, w)
        raw = rest[:, :, 1]
        means, log_scales = (
            rest[:, :, 0],
            (softplus_logstd(raw) if self.softplus_std else raw).clamp(min=self.min_log_scale),
        )
        coeffs = torch.tanh(rest[:, :, 2]) if c == 3 else None
        return logits, means, log_scales, coeffs

    @staticmethod
    def _coupled_means(means, coeffs, x):
        """Shift the G and B means by the (given or sampled) R and G values: x is (N, C, 1 or M, H, W)."""
        if coeffs is None:
            return means
        r, g = x[:, 0], x[:, 1]
        return torch.stack(
            [means[:, 0], means[:, 1] + coeffs[:, 0] * r, means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g], dim=1
        )

    def _log_mass(self, x, means, log_scales):
        """log of each component's mass on the bin of x: x (N, C, 1, H, W), coupled means (N, C, M, H, W)."""
        centered = x - means
        inv_scale = torch.exp(-log_scales)
        half_bin = 1.0 / self.levels
        upper = inv_scale * (centered + half_bin)
        lower = inv_scale * (centered - half_bin)
        # Edge bins take the open tails, so the bins tile the real line.
        return torch.where(
            x < -1 + half_bin,
            F.logsigmoid(upper),
            torch.where(x > 1 - half_bin, F.logsigmoid(-lower), _log_bin_mass(upper, lower)),
        )

    def log_prob(self, params, target):
        """log p(target | params) summed over pixels and channels: (N,). target (N, C, H, W) on the grid."""
        with torch.autocast(params.device.type, enabled=False):
            params, target = params.float(), target.float()
            logits, means, log_scales, coeffs = self._split(params)
            x = target.unsqueeze(2)  # (N, C, 1, H, W), broadcast over mixtures
            log_mass = self._log_mass(x, self._coupled_means(means, coeffs, x), log_scales)
            log_mix = log_mass.sum(dim=1) + torch.log_softmax(logits, dim=1)  # (N, M, H, W)
            return torch.logsumexp(log_mix, dim=1).sum(dim=(1, 2))

    @property
    def n_symbols(self) -> int:
        return self.levels + 1

    def symbols(self, target):
        """Grid values -> the integer levels 0..2^bits - 1 an entropy coder codes."""
        return torch.round((target + 1) / 2 * self.levels).long()

    def grid(self, symbols):
        return symbols.double() * (2 / self.levels) - 1

    def channel_pmf(self, params, target, channel: int):
        """p(x_c = k | x_<c) for every level k and pixel of channel c: (N * H * W, 2^bits) float64.

        The earlier channels' values come from `target` (later channels are ignored). They shift this
        channel's means and reweight the mixture by their own masses, so the product over channels is
        the joint pmf of `log_prob`.
        """
        with torch.autocast(params.device.type, enabled=False):
            logits, means, log_scales, coeffs = self._split(params.double())
            x = target.double().unsqueeze(2)
            means = self._coupled_means(means, coeffs, x)
            log_weights = torch.log_softmax(logits, dim=1)
            if channel:
                seen = slice(0, channel)
                log_weights = log_weights + self._log_mass(x[:, seen], means[:, seen], log_scales[:, seen]).sum(1)
            weights = torch.softmax(log_weights, dim=1)  # (N, M, H, W)
            edges = torch.arange(self.levels, dtype=torch.float64, device=params.device) * (2 / self.levels)
            edges = edges + (1 / self.levels - 1)  # the bin boundaries between the levels
            mu, inv_scale = means[:, channel].unsqueeze(-1), torch.exp(-log_scales[:, channel]).unsqueeze(-1)
            pmfs = []
            for i in range(len(params)):  # one image at a time: the CDFs are (M, H, W, levels)
                cdf = (weights[i].unsqueeze(-1) * torch.sigmoid((edges - mu[i]) * inv_scale[i])).sum(0)
                cdf = F.pad(F.pad(cdf, (1, 0), value=0.0), (0, 1), value=1.0)
                pmfs.append(cdf.diff(dim=-1).clamp(min=0).reshape(-1, self.n_symbols))
            return torch.cat(pmfs)

    def sample(self, params, mode: bool = False):
        """Values on the target grid, (N, C, H, W). `mode`: the most likely component's means, no noise."""
        with torch.autocast(params.device.type, enabled=False):
            logits, means, log_scales, coeffs = self._split(params.float())
            if mode:
                choice = logits.argmax(dim=1)
            else:
                choice = torch.distributions.Categorical(logits=logits.movedim(1, -1)).sample()
            pick = F.one_hot(choice, self.n_mix).movedim(-1, 1).unsqueeze(1).to(means.dtype)  # (N, 1, M, H, W)
            mu = (means * pick).sum(2)
            log_s = (log_scales * pick).sum(2)
            if not mode:
                u = torch.rand(mu.shape, dtype=mu.dtype, device=mu.device).clamp(1e-5, 1 - 1e-5)
                mu = mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))
            values = [mu[:, 0].clamp(-1, 1)]
            if coeffs is not None:
                c = (coeffs * pick).sum(2)
                values.append((mu[:, 1] + c[:, 0] * values[0]).clamp(-1, 1))
                values.append((mu[:, 2] + c[:, 1] * values[0] + c[:, 2] * values[1]).clamp(-1, 1))
            x = torch.stack(values, dim=1)
            return self.quantize(x)

    def quantize(self, x):
        """Round values in [-1, 1] to the nearest grid point 2k / levels - 1."""
        return torch.round((x + 1) / 2 * self.levels) / self.levels * 2 - 1

    def to_uint8(self, x):
        """Grid values -> 8-bit images in [0, 255]."""
        return torch.round((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


class Bernoulli(nn.Module):
    """Output head and pmf of independent Bernoulli pixels, for binary images (targets in {0, 1})."""

    def __init__(self, width: int, channels: int = 1):
        super().__init__()
        self.channels = channels
        self.out_conv = conv(width, channels, 1)

    def forward(self, h):
        return self.out_conv(h)

    def log_prob(self, params, target):
        with torch.autocast(params.device.type, enabled=False):
            ll = -F.binary_cross_entropy_with_logits(params.float(), target.float(), reduction="none")
            return ll.sum(dim=(1, 2, 3))

    n_symbols = 2

    def symbols(self, target):
        return target.long()

    def grid(self, symbols):
        return symbols.double()

    def channel_pmf(self, params, target, channel: int):
        """p(x_c = 0) and p(x_c = 1) for every pixel of channel c: (N * H * W, 2) float64."""
        logit = params[:, channel].double().reshape(-1)
        return torch.stack([torch.sigmoid(-logit), torch.sigmoid(logit)], dim=1)

    def sample(self, params, mode: bool = False):
        probs = torch.sigmoid(params.float())
        return (probs > 0.5).float() if mode else torch.bernoulli(probs)

    def to_uint8(self, x):
        return (x * 255).round().to(torch.uint8)


def nats_to_bits(x):
    return x / math.log(2)
