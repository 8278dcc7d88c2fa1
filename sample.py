"""Pictures from a checkpoint: `python sample.py ckpt_path=... mode=samples|reconstruct|interpolate|encode|decode`
(`vdvae-sample`)."""

from vdvae.cli import sample

if __name__ == "__main__":
    sample()
