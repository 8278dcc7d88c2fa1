"""Pictures from a checkpoint: `python sample.py ckpt_path=... mode=samples|reconstruct|interpolate|encode|decode`."""

import logging

import hydra
from omegaconf import DictConfig

from vdvae.sample import sample

log = logging.getLogger(__name__)


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    for path in sample(cfg):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
