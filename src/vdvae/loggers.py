"""Loggers: Weights & Biases online when the user has credentials, offline (synced later) otherwise, never
prompting; and a CSV logger whose file a resumed run continues. A resumed run keeps its W&B run
(its id travels in the checkpoint) and its CSV and TensorBoard directories (fixed version 0)."""

import csv
import logging
import netrc
import os
import re

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


def wandb_credentials() -> bool:
    """Whether `wandb login` or WANDB_API_KEY has given this machine a key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return (
            netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
        )
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str | None = None) -> str:
    """`mode` if given, else WANDB_MODE, else online exactly when this machine has W&B credentials."""
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode must be online, offline or disabled, got {mode!r}")
    return mode


def wandb_logger(
    save_dir: str,
    project: str = "vdvae",
    mode: str | None = None,
    log_model: bool | None = None,
    resume_id: str | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger; `mode` (or WANDB_MODE) "online"/"offline", else online exactly when credentials exist.

    When online, checkpoints are uploaded as artifacts (`log_model`). `resume_id` continues that W&B run.
    """
    mode = wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    if mode != "online":
        log.info("W&B %s: runs are kept in %s/wandb; `wandb sync` uploads them later", mode, save_dir)
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        mode=mode,
        log_model=(mode == "online") if log_model is None else log_model,
        **({"id": resume_id, "resume": "allow"} if resume_id else {}),
        **kwargs,
    )
    # Lightning always passes wandb.init an `anonymous` setting, which current wandb warns has no effect.
    logger._wandb_init.pop("anonymous", None)
    return logger


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self):
        # Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class ContinuingCSVLogger(CSVLogger):
    """A CSVLogger that appends to the metrics of the run it resumes instead of deleting them."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def loggers_from_config(configs, checkpoint: dict | None) -> list:
    """The configured loggers; when resuming from `checkpoint`, W&B continues the run recorded in it."""
    loggers = []
    for config in (configs or {}).values():
        if config is None:
            continue
        resume_id = (checkpoint or {}).get("wandb_run_id")
        if resume_id is not None and not (isinstance(resume_id, str) and re.fullmatch(r"[\w-]{1,64}", resume_id)):
            log.warning("the checkpoint's W&B run id %r is not one; a new W&B run is started", resume_id)
            resume_id = None
        is_wandb = config.get("_target_") == f"{__name__}.wandb_logger"
        loggers.append(instantiate(config, resume_id=resume_id) if is_wandb and resume_id else instantiate(config))
    return loggers
