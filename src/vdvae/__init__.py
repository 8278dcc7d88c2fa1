"""vdvae: Very Deep VAEs (Child 2020) with PyTorch Lightning and Hydra.

`VAE`, `ELBO` and `VDVAEModule` load on first use, so that the commands read and check their config
(and report a mistake in it) before torch and Lightning are imported, which takes seconds.
"""

import importlib

import vdvae.config  # noqa: F401  (registers the resolvers the configs use)

__all__ = ["ELBO", "VAE", "VDVAEModule"]
_HOMES = {"ELBO": "vdvae.model", "VAE": "vdvae.model", "VDVAEModule": "vdvae.lit_module"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'vdvae' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
