"""The commands: `vdvae-train`, `vdvae-eval`, `vdvae-sample`, `vdvae-compress` and `vdvae-import` (also
`python train.py` and the other scripts at the repository root, which call these).

The configs ship inside the package (`vdvae.conf`, the repository's `conf/`), so the commands work from
any directory after `pip install`. Your own presets live in a directory of yours, added to the search
path with Hydra's `--config-dir`: `vdvae-train --config-dir my_conf model=my_model` finds
`my_conf/model/my_model.yaml`.
"""

import importlib
import importlib.util
import logging
import sys

import hydra
from omegaconf import DictConfig

from vdvae.errors import refuse
from vdvae.lifecycle import command

CONFIGS = "pkg://vdvae.conf"
log = logging.getLogger(__name__)


def register_plugins():
    """This package's sweepers and launchers (hydra_plugins.vdvae_sweepers), for Hydra: its plugin scan
    cannot list a package installed in editable mode."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    plugins = Plugins.instance()  # first: its scan runs the plugin modules again, making new classes
    from hydra_plugins.vdvae_sweepers import local_launcher, sweepers

    plugins.register(local_launcher.LocalLauncher)
    if issubclass(sweepers.OptunaSweeper, Sweeper):  # where the optuna extra is installed
        plugins.register(sweepers.OptunaSweeper)
    from hydra_plugins.vdvae_sweepers.slurm_launcher import SlurmLauncher

    if issubclass(SlurmLauncher, Launcher):  # where the slurm extra is installed
        plugins.register(SlurmLauncher)


# The choices that need an extra, and the module each needs: chosen without it, a command says which extra
# to install in one line, instead of Hydra's error that the config is missing.
EXTRAS = {
    "hydra/launcher=slurm": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    "hparams_search=optuna": ("optuna", "hydra_plugins.hydra_optuna_sweeper"),
    "hydra/sweeper=optuna": ("optuna", "hydra_plugins.hydra_optuna_sweeper"),
}


def check_extras(argv: list[str]):
    """Refuse, in one line, a choice in `argv` whose extra is not installed (EXTRAS)."""
    for choice, (extra, module) in EXTRAS.items():
        if choice in argv and importlib.util.find_spec(module) is None:
            refuse(f"{choice} needs the {extra} extra: pip install '.[{extra}]' (or 'vdvae[{extra}]' from an index)")


register_plugins()


def _command(recipe: str, cfg: DictConfig, writes_files: bool = False, interruptible: bool = True):
    """The recipe `vdvae.tasks.<module>:<function>` run as a command (vdvae.lifecycle.command), imported
    inside it: a stop during the imports is handled too. The files it wrote are logged."""

    def run(cfg):
        module, function = recipe.split(":")
        result = getattr(importlib.import_module(f"vdvae.tasks.{module}"), function)(cfg)
        if writes_files:
            for path in result:
                log.info("wrote %s", path)
            from vdvae.loggers import log_request

            log_request(cfg, result)  # its W&B run, beside the training run's
        return result

    return command(run, cfg, interruptible)


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float | None:
    """Train a VDVAE; returns the metric a sweep optimizes."""
    return _command("train:train", cfg, interruptible=False)  # it stops at a step boundary itself


def train():
    """Train a VDVAE. `ckpt_path=<checkpoint>` alone resumes its run as that run's command configured it
    (vdvae.resume.with_recorded_overrides), with the overrides typed now on top."""
    from vdvae.resume import with_recorded_overrides  # here: the other commands start without Lightning

    check_extras(sys.argv)
    sys.argv = with_recorded_overrides(sys.argv)
    _train()


@hydra.main(config_path=CONFIGS, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    """Score a checkpoint on its test set."""
    _command("eval:evaluate", cfg)


@hydra.main(config_path=CONFIGS, config_name="sample", version_base="1.3")
def sample(cfg: DictConfig) -> None:
    """Samples, reconstructions, interpolations, latents from a checkpoint."""
    _command("sample:sample", cfg, writes_files=True)


def import_original(argv=None):
    """Convert the original VDVAE code's weights into a checkpoint."""
    from vdvae.tasks.import_original import main

    main(argv)


@hydra.main(config_path=CONFIGS, config_name="compress", version_base="1.3")
def compress(cfg: DictConfig) -> None:
    """Compress images losslessly with a checkpoint (bits-back coding), or decompress a file."""
    _command("compress:compress", cfg, writes_files=True)
