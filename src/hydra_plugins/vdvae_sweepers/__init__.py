"""Hydra sweepers of the vdvae package (a Hydra plugin: Hydra finds sweepers in `hydra_plugins`)."""
