"""The commands: `vdvae-train`, `vdvae-eval`, `vdvae-sample`, `vdvae-compress` and `vdvae-import` (also
`python train.py` and the other scripts at the repository root, which call these).

The configs ship inside the package (`vdvae.conf`, the repository's `conf/`), so the commands work from
any directory after `pip install`. Your own presets live in a directory of yours, added to the search
path with Hydra's `--config-dir`: `vdvae-train --config-dir my_conf model=my_model` finds
`my_conf/model/my_model.yaml`.
"""

import contextlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

import vdvae.config  # noqa: F401  (registers the resolvers the configs use)

CONFIGS = "pkg://vdvae.conf"
log = logging.getLogger(__name__)


def register_plugins():
    """This package's sweepers and launchers (hydra_plugins.vdvae_sweepers), for Hydra: its plugin scan
    cannot list a package installed in editable mode."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    plugins = Plugins.instance()  # first: its scan runs the plugin modules again, making new classes
    from hydra_plugins.vdvae_sweepers import local_launcher, sweepers

    plugins.register(local_launcher.LocalLauncher)
    for sweeper in (sweepers.BasicSweeper, sweepers.OptunaSweeper):
        if issubclass(sweeper, Sweeper):  # the Optuna one where the optuna extra is installed
            plugins.register(sweeper)
    try:  # where the slurm extra is installed
        from hydra_plugins.vdvae_sweepers.slurm_launcher import SlurmLauncher
    except ImportError:
        return
    plugins.register(SlurmLauncher)


register_plugins()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _in_a_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def refusals_in_one_line(interruptible: bool):
    """A refusal (a ValueError or OSError: bad input, a damaged file, a folder it cannot write) ends the
    command with one line, `Error: ...`, and exit status 1 (HYDRA_FULL_ERROR=1: the traceback instead).
    `interruptible`: SIGTERM and Ctrl-C stop the command at once with 143 or 130. Either way a run
    directory that this run created and that holds nothing but its config and log is removed."""
    from vdvae.config import remove_empty_run_dir
    from vdvae.interrupts import Interrupted, signals_interrupt
    from vdvae.sweeps import TrainingStalled as RunFailed  # a run stopped by its stall guard

    try:
        with signals_interrupt() if interruptible else contextlib.nullcontext():
            yield
    except Interrupted as stop:
        remove_empty_run_dir()
        log.error("%s; no result written", stop)
        raise SystemExit(stop.exit_code) from None
    except (ValueError, OSError, RunFailed) as error:
        remove_empty_run_dir()
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_a_sweep():
            raise  # a sweep's job fails alone: Hydra records it and runs the others
        raise SystemExit(f"Error: {_one_line(error)}{_traceback_kept_in_log(error)}") from None


def _traceback_kept_in_log(error: BaseException) -> str:
    """Append the traceback to the run's log file where the run directory is kept (a failure after work
    started: worth reading), and say where; "" where there is none."""
    import traceback
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    config = HydraConfig.get()
    path = Path(config.runtime.output_dir) / f"{config.job.name}.log"
    if not path.is_file():
        return ""
    with open(path, "a") as file:
        file.write("".join(traceback.format_exception(error)))
    return f" (traceback in {path})"


def finish_wandb():
    """End the W&B run of this job, if a logger started one: one W&B run per job, also in multirun sweeps.
    Without a W&B logger wandb is never imported (runs with logger=csv need no wandb installed)."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """Train a VDVAE; returns the metric a sweep optimizes."""
    from vdvae.tasks.train import train as run

    try:  # SIGTERM: training saves at the next step and exits 143 itself (vdvae.tasks.train)
        with refusals_in_one_line(interruptible=False):
            return run(cfg)
    finally:
        finish_wandb()


@hydra.main(config_path=CONFIGS, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    """Score a checkpoint on its test set."""
    with refusals_in_one_line(interruptible=True):  # before the imports: a stop during them is handled too
        from vdvae.tasks.eval import evaluate as run

        try:
            run(cfg)
        finally:
            finish_wandb()


@hydra.main(config_path=CONFIGS, config_name="sample", version_base="1.3")
def sample(cfg: DictConfig) -> None:
    """Samples, reconstructions, interpolations, latents from a checkpoint."""
    with refusals_in_one_line(interruptible=True):
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
    with refusals_in_one_line(interruptible=True):
        from vdvae.tasks.compress import compress as run

        for path in run(cfg):
            log.info("wrote %s", path)
