"""The commands: `vdvae-train`, `vdvae-eval`, `vdvae-sample`, `vdvae-compress` and `vdvae-import` (also
`python train.py` and the other scripts at the repository root, which call these).

The configs ship inside the package (`vdvae.conf`, the repository's `conf/`), so the commands work from
any directory after `pip install`. Your own presets live in a directory of yours, added to the search
path with Hydra's `--config-dir`: `vdvae-train --config-dir my_conf model=my_model` finds
`my_conf/model/my_model.yaml`.
"""

import logging

import hydra
from omegaconf import DictConfig

import vdvae.config  # noqa: F401  (registers the resolvers the configs use)

CONFIGS = "pkg://vdvae.conf"
log = logging.getLogger(__name__)


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """Train a VDVAE; returns the metric a sweep optimizes."""
    import wandb

    from vdvae.tasks.train import train as run

    try:
        return run(cfg)
    finally:
        wandb.finish()  # one W&B run per job, also in multirun sweeps


@hydra.main(config_path=CONFIGS, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    """Score a checkpoint on its test set."""
    import wandb

    from vdvae.tasks.eval import evaluate as run

    try:
        run(cfg)
    finally:
        wandb.finish()


@hydra.main(config_path=CONFIGS, config_name="sample", version_base="1.3")
def sample(cfg: DictConfig) -> None:
    """Samples, reconstructions, interpolations, latents from a checkpoint."""
    from vdvae.tasks.sample import sample as run

    for path in run(cfg):
        log.info("wrote %s", path)


def import_original(argv=None):
    """Convert the original VDVAE code's weights into a checkpoint."""
    from vdvae.tasks.import_original import main

    main(argv)


@hydra.main(config_path=CONFIGS, config_name="compress", version_base="1.3")
def compress(cfg: DictConfig) -> None:
    """Compress images losslessly with a checkpoint (bits-back coding), or decompress a file."""
    from vdvae.tasks.compress import compress as run

    for path in run(cfg):
        log.info("wrote %s", path)
