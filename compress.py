"""Lossless compression with a checkpoint: `python compress.py ckpt_path=... mode=compress|decompress`
(`vdvae-compress`)."""

from vdvae.cli import compress

if __name__ == "__main__":
    compress()
