"""Pictures from a checkpoint (`vdvae-sample`):
`python sample.py ckpt_path=... mode=samples|reconstruct|interpolate|encode|decode|overview`."""

from vdvae.cli import sample

if __name__ == "__main__":
    sample()
