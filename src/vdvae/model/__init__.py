"""The VDVAE model: blocks, latent distributions, likelihoods and the hierarchical VAE."""

from vdvae.model.vae import ELBO, VAE, NonFiniteOutputError

__all__ = ["ELBO", "VAE", "NonFiniteOutputError"]
