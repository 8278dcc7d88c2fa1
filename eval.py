"""Score a checkpoint on its test set: `python eval.py ckpt_path=... iw_samples=1000`."""

import hydra
import wandb
from omegaconf import DictConfig

from vdvae.eval import evaluate


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    finally:
        wandb.finish()


if __name__ == "__main__":
    main()
