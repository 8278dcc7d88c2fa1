"""Train a VDVAE: `python train.py` (the quick start), `python train.py model=vdvae data=cifar10`,
`python train.py experiment=imagenet64`, `python train.py -m model.lr=1e-4,2e-4` (a sweep)."""

import hydra
import wandb
from omegaconf import DictConfig

from vdvae.train import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    finally:
        wandb.finish()  # one W&B run per job, also in multirun sweeps


if __name__ == "__main__":
    main()
