"""Hydra plugins of the vdvae package: its sweepers and launchers (Hydra finds plugins in `hydra_plugins`)."""
