"""A run's folder and its layout: the one place that knows where a run keeps what.

    <run>/.hydra/config.yaml     the config the run started with (it marks the folder as a run's)
    <run>/<task>.log             the log
    <run>/checkpoints/last.ckpt  the latest state; best-*.ckpt beside it

The folder of the running job is Hydra's output directory.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def checkpoints(run_dir) -> Path:
    return Path(str(run_dir)) / CHECKPOINT_DIR


def last_checkpoint(run_dir) -> Path:
    return checkpoints(run_dir) / LAST


def holds_a_run(directory) -> bool:
    """Whether `directory` is the run directory of an earlier run (Hydra saved its config there)."""
    return (Path(str(directory)) / ".hydra" / "config.yaml").is_file()


def run_of_checkpoint(ckpt_path) -> Path | None:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.ckpt` with `<run>/.hydra`), if any."""
    if not ckpt_path or str(ckpt_path).startswith("wandb:"):
        return None
    path = Path(str(ckpt_path)).expanduser().absolute()
    run = path.parent.parent
    if path.parent.name == CHECKPOINT_DIR and holds_a_run(run):
        return run
    return None


def current() -> Path | None:
    """This job's run folder, or None outside a Hydra job."""
    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def log_file() -> Path | None:
    """This job's log file (it may not exist yet), or None outside a Hydra job."""
    folder = current()
    return None if folder is None else folder / f"{HydraConfig.get().job.name}.log"


def overrides() -> list[str]:
    """The overrides this job was started with ([] outside a Hydra job)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
