"""Hydra plugins of the vdvae package: its sweepers and its SLURM launcher (Hydra finds plugins in `hydra_plugins`)."""
