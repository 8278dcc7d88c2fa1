"""Latent pruning (Efficient-VDVAE): keep the posterior only in the variates that carry information.

A variate is one channel of one latent group. Its information is its KL averaged over images and
positions; the `quantile` most informative variates of all groups together are kept (Efficient-VDVAE
keeps 3%), and the rest are drawn from the prior at no KL, so the pruned ELBO says what they were worth.
"""

import torch

from vdvae.model import VAE


@torch.no_grad()
def variate_kl(vae: VAE, batches) -> list[torch.Tensor]:
    """Mean KL (nats) of every variate, per group a (zdim,) tensor, over (input, target) batches."""
    totals, count = None, 0
    for x, _ in batches:
        x = vae._check_input(x)
        _, groups = vae.decoder(x.shape[0], vae.encoder(x), use_mean=False, keep_distributions=False)
        sums = [g.kl.double().sum(dim=(0, 2, 3)) / (g.kl.shape[2] * g.kl.shape[3]) for g in groups]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums, strict=True)]
        count += x.shape[0]
    return [t / count for t in totals]


def variate_masks(kl: list[torch.Tensor], quantile: float) -> list[torch.Tensor]:
    """Masks keeping the variates whose mean KL is above the (1 - quantile) quantile over all groups."""
    if not 0 < quantile <= 1:
        raise ValueError(f"the quantile of variates to keep must be in (0, 1], got {quantile}")
    threshold = torch.quantile(torch.cat(kl), 1 - quantile)
    return [k > threshold if quantile < 1 else torch.ones_like(k, dtype=torch.bool) for k in kl]
