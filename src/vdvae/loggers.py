"""Loggers: Weights & Biases online when the user has credentials, offline (synced later) otherwise, never
prompting; and a CSV logger whose file a resumed run continues. A resumed run keeps its W&B run
(its id travels in the checkpoint) and its CSV and TensorBoard directories (fixed version 0).

W&B runs are organised for a dashboard (vdvae.dashboard): a run's group is its folder's name, a sweep job's
the sweep folder's (with the sweep's summary run), an eval's the group of the run it scores; a sweep job is
named by its number and the overrides the sweep varies (SWEPT_KEYS), a run by its folder; the job type is
the command (train, eval, ...). The step is every metric's x-axis and the summary keeps the best val/bpd.
"""

import csv
import logging
import netrc
import os
import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from vdvae.errors import one_line

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


# The environment variable by which a sweep tells its jobs (also in processes and on nodes of their own)
# which override keys it varies: a job's W&B name is made of those.
SWEPT_KEYS = "VDVAE_SWEPT_KEYS"


def run_identity() -> dict:
    """The W&B group, name and job type of this Hydra job (nothing outside one; see the module's docstring)."""
    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        swept = set(filter(None, os.environ.get(SWEPT_KEYS, "").split(",")))
        varied = [o for o in hydra.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
        group, name = Path(str(hydra.sweep.dir)).name, " ".join([f"#{hydra.job.num}", *varied])
    else:
        group = name = Path(str(hydra.runtime.output_dir)).name
    return {"group": group, "name": name[:128], "job_type": hydra.job.name}


def wandb_logger(
    save_dir: str,
    project: str = "vdvae",
    mode: str | None = None,
    log_model: bool | None = None,
    resume_id: str | None = None,
    group: str | None = None,
    name: str | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger; `mode` (or WANDB_MODE) "online"/"offline", else online exactly when credentials exist.

    When online, checkpoints are uploaded as artifacts (`log_model`). `resume_id` continues that W&B run.
    `group` and `name`: this job's (`run_identity`) where None.
    """
    identity = run_identity()
    kwargs = {"group": group or identity.get("group"), "name": name or identity.get("name"), **kwargs}
    kwargs.setdefault("job_type", identity.get("job_type"))
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


def request_loggers(configs, checkpoint: dict, ckpt_path: str) -> list:
    """The configured loggers of a command that uses a checkpoint (eval, sample, compress): its W&B run joins
    the group of the run that trained it, and (online, for a W&B artifact) uses the artifact, so that W&B
    draws the lineage."""
    from vdvae.run_folder import run_of_checkpoint

    trained = run_of_checkpoint(ckpt_path)
    group = recorded(checkpoint, "wandb_group") or (trained.name if trained else None)
    loggers = loggers_from_config(configs, group=group)
    for logger in loggers:
        if isinstance(logger, WandbLogger) and str(ckpt_path).startswith("wandb:") and not logger.experiment.offline:
            logger.experiment.use_artifact(str(ckpt_path)[len("wandb:") :])
    return loggers


def request_config(cfg, checkpoint: dict) -> dict:
    """What a command that uses a checkpoint logs as its config: its options, the checkpoint's step and the
    W&B run that trained it."""
    from omegaconf import OmegaConf

    request = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("logger", "paths")}
    return {**request, "step": checkpoint.get("global_step"), "trained_wandb_run": checkpoint.get("wandb_run_id")}


# The most images of one command that its W&B run shows (a grid is one image; decompress writes a folder).
MAX_LOGGED_IMAGES = 16


def log_request(cfg, files: list) -> None:
    """sample.py and compress.py: their run with the configured loggers (`logger`), in the group of the run
    that trained the checkpoint, with the request's options and what it made (its PNG figures; compress's
    report)."""
    if not configured(cfg.get("logger")):
        return
    import json

    from vdvae.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(cfg.ckpt_path)  # read already: the command's own copy
    request = request_config(cfg, checkpoint)
    files = [Path(f) for f in files]
    reports = [json.loads(f.read_text()) for f in files if f.name == "report.json"]
    numbers = {f"{cfg.task_name}/{k}": v for r in reports for k, v in r.items() if isinstance(v, (int, float))}
    for logger in request_loggers(cfg.logger, checkpoint, cfg.ckpt_path):
        logger.log_hyperparams(request)
        if numbers:
            logger.log_metrics(numbers)
        if isinstance(logger, WandbLogger):
            for figure in [f for f in files if f.suffix == ".png"][:MAX_LOGGED_IMAGES]:
                logger.log_image(key=f"{cfg.task_name}/{figure.stem}", images=[str(figure)])
        logger.finalize("success")


def define_metrics(loggers: list):
    """On each W&B logger: the best (lowest) val/bpd in the run's summary (Lightning already makes the step
    every metric's x-axis)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.define_metric("val/bpd", step_metric="trainer/global_step", summary="min")


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


def configured(configs) -> list:
    """The logger configs chosen (none with logger=none)."""
    return [config for config in (configs or {}).values() if config is not None]


def loggers_from_config(configs, **wandb) -> list:
    """The configured loggers; `wandb`: options of the W&B logger that its config leaves unset (`resume_id`:
    the W&B run to continue, `group`)."""
    loggers = []
    for config in configured(configs):
        if config.get("_target_") == f"{__name__}.wandb_logger":
            loggers.append(instantiate(config, **{k: v for k, v in wandb.items() if v and config.get(k) is None}))
        else:
            loggers.append(instantiate(config))
    return loggers


# What a checkpoint may say of its W&B run: the form each must have (a file is data from anywhere), what it
# is, and what happens without it.
RECORDED = {
    "wandb_run_id": (r"[\w-]{1,64}", "W&B run id", "a new W&B run is started"),
    "wandb_group": (r"[^\x00-\x1f\x7f]{1,128}", "W&B group", "the run folder's name is the group"),
}


def recorded(checkpoint: dict | None, key: str) -> str | None:
    """The checkpoint's W&B run id or group (`key`, see RECORDED), where it has one of the right form."""
    value = (checkpoint or {}).get(key)
    pattern, what, otherwise = RECORDED[key]
    if value is not None and not (isinstance(value, str) and re.fullmatch(pattern, value)):
        log.warning("the checkpoint's %s %s is not one; %s", what, one_line(repr(value), 100), otherwise)
        return None
    return value
