"""Scoring a model the way papers do: the single-sample ELBO, an importance-weighted bound on
log p(x) with K samples (Burda et al. 2016), and active units per latent group.

log p(x) >= IW_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)],  IW_1 = the single-sample ELBO,
and IW_K grows with K towards log p(x). A unit (one dimension of a group's latent) is active when
its posterior mean varies across the data: Var_x E_q[z | x] > 0.01.
"""

import math

import torch
from torch.distributions import Normal
from torchmetrics import Metric

from vdvae.model import VAE


def log_weights(vae: VAE, x, target):
    """log p(x, z) - log q(z | x) per image for one posterior sample z, in nats: (N,)."""
    h, groups = vae.decoder(x.shape[0], vae.encoder(vae._check_input(x)))
    log_w = vae.likelihood.log_prob(vae.likelihood(h), target)
    for g in groups:
        prior, posterior = (
            Normal(g.prior[0].float(), g.prior[1].float().exp()),
            Normal(g.posterior[0].float(), g.posterior[1].float().exp()),
        )
        z = g.z.float()
        log_w = log_w + (prior.log_prob(z) - posterior.log_prob(z)).sum(dim=(1, 2, 3))
    return log_w


@torch.no_grad()
def iw_bound(vae: VAE, x, target, k: int, chunk: int = 64):
    """The K-sample importance-weighted bound of every image, nats per image: (N,).

    Each forward pass scores up to `chunk` (image, sample) pairs.
    """
    if k < 1:
        raise ValueError(f"the number of importance samples must be at least 1, got {k}")
    per_pass = max(1, chunk // x.shape[0])
    weights = []
    for start in range(0, k, per_pass):
        reps = min(per_pass, k - start)
        lw = log_weights(vae, x.repeat(reps, 1, 1, 1), target.repeat(reps, 1, 1, 1))
        weights.append(lw.view(reps, x.shape[0]))
    weights = torch.cat(weights)  # (K, N)
    return torch.logsumexp(weights, dim=0) - math.log(k)


class RunningMoments(Metric):
    """Sums of values and their squares over images, per element of `shape` (float64; exact over devices)."""

    full_state_update = False

    def __init__(self, shape=(), **kwargs):
        super().__init__(**kwargs)
        for name in ("sum", "sum_sq"):
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values):
        """values: (N, *shape), one row per image."""
        values = values.double()
        self.sum += values.sum(0)
        self.sum_sq += (values**2).sum(0)
        self.count += values.shape[0]

    def moments(self):
        """The mean and the unbiased variance over the images seen."""
        n = self.count
        mean = self.sum / n.clamp(min=1)
        return mean, ((self.sum_sq - n * mean**2) / (n - 1).clamp(min=1)).clamp(min=0)


class ActiveUnits(RunningMoments):
    """Per group: how many latent dimensions have Var_x[E_q z] above `threshold`."""

    def __init__(self, group_sizes: list[int], threshold: float = 0.01, **kwargs):
        super().__init__((sum(group_sizes),), **kwargs)
        self.group_sizes, self.threshold = list(group_sizes), threshold

    def update(self, means: list):
        super().update(torch.cat([m.flatten(1) for m in means], dim=1))  # (N, total dims)

    def compute(self):
        active = (self.moments()[1] > self.threshold).split(self.group_sizes)
        return torch.stack([a.sum() for a in active])


class IWMetric(RunningMoments):
    """Mean and standard error of a per-image bound (nats per image)."""

    def update(self, values):
        super().update(values.flatten())

    def compute(self):
        mean, variance = self.moments()
        return mean, (variance / self.count.clamp(min=1)).sqrt()
