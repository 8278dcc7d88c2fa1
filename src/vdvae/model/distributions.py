"""The diagonal Gaussians of the latent groups: their KL, their samples, and Efficient-VDVAE's softplus
parameterization of the standard deviation. Every function works elementwise on log standard deviations."""

import math

import torch
import torch.nn.functional as F


def gaussian_kl(mean_q, logstd_q, mean_p, logstd_p):
    """KL(N(mean_q, exp(logstd_q)^2) || N(mean_p, exp(logstd_p)^2)), elementwise.

    Written with expm1 so that it stays accurate when q is close to p (as at initialization).
    """
    d = 2 * (logstd_q - logstd_p)
    return 0.5 * (torch.expm1(d) - d + ((mean_q - mean_p) * torch.exp(-logstd_p)) ** 2)


SOFTPLUS_BETA = math.log(2.0)  # Efficient-VDVAE's "gradient smoothing": std(0) = 1, as exp(0)


def softplus_logstd(raw):
    """log std for std = softplus(beta * raw) / beta with beta = ln 2 (Efficient-VDVAE's parameterization):
    the std grows linearly, not exponentially, in the network's output. For beta * raw < -20 the std is
    exp(beta * raw) / beta to float precision, so its log is written out there (no log of an underflow)."""
    x = SOFTPLUS_BETA * raw
    return torch.where(x < -20, x, torch.log(F.softplus(x.clamp(min=-20)))) - math.log(SOFTPLUS_BETA)


def gaussian_sample(mean, logstd, temperature=1.0):
    """mean + temperature * std * eps; temperature 0 returns the mean exactly."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return mean
    # randn, not randn_like: the same noise whatever the memory format (channels_last or not).
    eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    return mean + temperature * torch.exp(logstd) * eps
