"""The configs, shipped in the package as `vdvae.conf` (see pyproject.toml)."""
