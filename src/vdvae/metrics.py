"""Every metric of a model, as torchmetrics accumulators exact under multi-device evaluation (sums and a
count): the ELBO's terms, an importance-weighted bound on log p(x) with K samples (Burda et al. 2016) and
active units per latent group; and the table the scripts print.

log p(x) >= IW_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)],  IW_1 = the single-sample ELBO,
and IW_K grows with K towards log p(x). A unit (one dimension of a group's latent) is active when
its posterior mean varies across the data: Var_x E_q[z | x] > 0.01.
"""

import math

import torch
from torch.distributions import Normal
from torchmetrics import Metric

from vdvae.model import VAE
from vdvae.model.likelihoods import nats_to_bits


class ELBOMetric(Metric):
    """Averages loss, distortion and rate (nats/dim) and the KL of every group (nats/image) over images."""

    full_state_update = False

    def __init__(self, n_groups: int, **kwargs):
        super().__init__(**kwargs)
        for name in ("loss", "distortion", "rate", "nats_per_image"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kl", torch.zeros(n_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, out):
        self.loss += out.loss.detach().double().sum()
        self.distortion += out.distortion.detach().double().sum()
        self.rate += out.rate.detach().double().sum()
        self.nats_per_image += out.loss.detach().double().sum() * out.ndims
        self.kl += out.kl.detach().double().sum(0)
        self.count += out.loss.shape[0]

    def compute(self):
        n = self.count.clamp(min=1)
        return {
            "loss": self.loss / n,
            "bpd": nats_to_bits(self.loss / n),
            "distortion": self.distortion / n,
            "rate": self.rate / n,
            "nats_per_image": self.nats_per_image / n,  # the negative ELBO per image (binarized MNIST's unit)
            "kl_per_group": self.kl / n,
            "n_images": self.count,
        }


def log_weights(vae: VAE, x, target, variate_masks=None):
    """log p(x, z) - log q(z | x) per image for one posterior sample z, in nats: (N,). With `variate_masks`
    (pruning: see VAE.forward) the pruned variates' proposal is the prior, which they are drawn from."""
    h, groups = vae.decoder(x.shape[0], vae.encoder(vae._check_input(x)), variate_masks=variate_masks)
    log_w = vae.likelihood.log_prob(vae.likelihood(h), target)
    for t, g in enumerate(groups):
        (p_mean, p_logstd), (q_mean, q_logstd) = g.prior, g.posterior
        if variate_masks is not None:
            kept = variate_masks[t].view(1, -1, 1, 1)
            q_mean, q_logstd = torch.where(kept, q_mean, p_mean), torch.where(kept, q_logstd, p_logstd)
        prior = Normal(p_mean.float(), p_logstd.float().exp())
        posterior = Normal(q_mean.float(), q_logstd.float().exp())
        z = g.z.float()
        log_w = log_w + (prior.log_prob(z) - posterior.log_prob(z)).sum(dim=(1, 2, 3))
    return log_w


@torch.no_grad()
def iw_bound(vae: VAE, x, target, k: int, chunk: int = 64, variate_masks=None):
    """The K-sample importance-weighted bound of every image, nats per image: (N,), of the model pruned by
    `variate_masks` if given.

    Each forward pass scores up to `chunk` (image, sample) pairs.
    """
    if k < 1:
        raise ValueError(f"the number of importance samples must be at least 1, got {k}")
    per_pass = max(1, chunk // x.shape[0])
    weights = []
    for start in range(0, k, per_pass):
        reps = min(per_pass, k - start)
        lw = log_weights(vae, x.repeat(reps, 1, 1, 1), target.repeat(reps, 1, 1, 1), variate_masks)
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


def format_table(metrics: dict) -> str:
    """Scalar metrics as an aligned two-column table, without the per-group rows (those go to files and charts)."""
    rows = [(k, f"{v:.5g}") for k, v in sorted(metrics.items()) if "/group_" not in k]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>12}" for k, v in rows)
