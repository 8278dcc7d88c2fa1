"""Train a VDVAE: `python train.py` (the quick start), `python train.py model=vdvae data=cifar10`,
`python train.py experiment=imagenet64`, `python train.py -m model.lr=1e-4,2e-4` (a sweep). Installed: `vdvae-train`."""

from vdvae.cli import train

if __name__ == "__main__":
    train()
