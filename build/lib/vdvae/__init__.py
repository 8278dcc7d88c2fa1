"""vdvae: Very Deep VAEs (Child 2020) with PyTorch Lightning and Hydra."""

import vdvae.config  # noqa: F401  (registers the resolvers the configs use)
from vdvae.lit_module import VDVAEModule
from vdvae.model import ELBO, VAE

__all__ = ["ELBO", "VAE", "VDVAEModule"]
