"""torchmetrics accumulators for the ELBO's terms, exact under multi-device evaluation (sums and a count), and
the table the scripts print."""

import torch
from torchmetrics import Metric

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


def format_table(metrics: dict) -> str:
    """Scalar metrics as an aligned two-column table, without the per-group rows (those go to files and charts)."""
    rows = [(k, f"{v:.5g}") for k, v in sorted(metrics.items()) if "/group_" not in k]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>12}" for k, v in rows)
