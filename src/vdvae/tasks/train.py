"""The training recipe: check the config, load the data, build module, callbacks, loggers and
trainer from the config, fit, test, and return the metric a sweep optimizes. Around it, the run
lifecycle (vdvae.lifecycle) decides how it ends; during fit and test its stop controller stops training
at a step boundary."""

import logging
import math
import os

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vdvae import run_folder, sweeps
from vdvae.callbacks import ModelSummary, TrainingProgress
from vdvae.checkpoints import check_writable, load_checkpoint, resolve
from vdvae.config import check_config, is_worker_process
from vdvae.errors import RunDiverged
from vdvae.lifecycle import StopController, checked_before_start, no_run_dir_on_failure, route_library_logs
from vdvae.loggers import configured, define_metrics, loggers_from_config, recorded
from vdvae.metrics import format_table
from vdvae.resume import OVERRIDES, ResumeState, check_fits, previous_last_checkpoint
from vdvae.schedule import check_schedule

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    route_library_logs()
    ckpt_path = cfg.get("ckpt_path") or previous_last_checkpoint()
    if ckpt_path and not cfg.get("ckpt_path"):
        log.warning("this run directory already holds %s: resuming from it", ckpt_path)
    # The config and the checkpoint it names, checked before the run started (not a requeued job's last.ckpt).
    checked = checked_before_start()
    with no_run_dir_on_failure():
        if not checked:
            check_config(cfg)
        L.seed_everything(cfg.seed, workers=True)
        # Gradient accumulation runs inside the training step (vdvae.lit_module): each loaded batch holds
        # all the batches of one update, and Lightning sees one batch per update.
        accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
        sizes = {
            "batch_size": cfg.data.batch_size * accumulate,
            "eval_batch_size": cfg.data.get("eval_batch_size") or cfg.data.batch_size,
        }
        datamodule = instantiate(cfg.data, **sizes) if accumulate > 1 else instantiate(cfg.data)
        datamodule.batches_per_update = accumulate  # its messages name data.batch_size, not the loaded batch
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            datamodule.prepare_data()
        datamodule.setup("fit")  # missing or corrupt data fails here, before any output is written
        # Not recursive: the data config is stored as plain values, not instantiated.
        data_config = OmegaConf.to_container(cfg.data, resolve=True)
        module = instantiate(cfg.model, accumulate_grad_batches=accumulate, _recursive_=False)
        if ckpt_path:  # a W&B artifact: downloaded once, and the local file is what training resumes from
            ckpt_path = str(resolve(ckpt_path))
        resumed = load_checkpoint(ckpt_path) if ckpt_path else None
        overrides = (resumed or {}).get(OVERRIDES)
        overrides = [o for o in overrides if o in run_folder.overrides()] if isinstance(overrides, list) else []
        if overrides:  # (cli.train added those not typed: vdvae.resume.with_recorded_overrides)
            log.info("resuming with the overrides of the run's command: %s", " ".join(overrides))
        if ckpt_path and not (checked and cfg.get("ckpt_path")):
            check_fits(resumed, ckpt_path, module)
        if not is_worker_process():  # (rank 0 alone writes the run folder)
            check_writable(run_folder.checkpoints(cfg.paths.output_dir))
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        if not configured(cfg.get("logger")):  # logger=none: no learning rate to log
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        callbacks.append(ResumeState(data_config))
        stop = StopController(at_step=True)  # also SLURM's pre-emption and time limits under submitit
        callbacks.append(stop.callback())
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(TrainingProgress())
        if cfg.trainer.get("enable_model_summary", True):
            callbacks.append(ModelSummary())
        # The trainer before the loggers, which write into the run directory: a trainer option Lightning
        # refuses (an accelerator the machine lacks, a misspelt strategy) leaves nothing behind.
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, accumulate_grad_batches=1)
        check_schedule(module.hparams, trainer.max_steps)
    # A resumed run continues the W&B run recorded in its checkpoint.
    trainer.loggers = loggers_from_config(cfg.get("logger"), resume_id=recorded(resumed, "wandb_run_id"))
    define_metrics(trainer.loggers)
    del resumed
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = sum(p.numel() for p in module.vae.parameters())
    log.info(
        "%s: %s parameters, %d latent groups; data %s; %d torch threads",
        cfg.model.get("_target_"),
        f"{n_params:,}",
        module.vae.n_groups,
        datamodule.name,
        torch.get_num_threads(),
    )

    with stop:
        try:
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            finally:
                sweeps.report(steps=trainer.global_step, best_val_bpd=best_score(trainer))
            metrics = scalars(trainer.callback_metrics)
            objective = cfg.get("optimized_metric")
            if objective and objective.startswith("val/") and objective not in metrics:
                # No validation ran (a run shorter than its validation interval): one now, so that a sweep
                # always gets its objective.
                log.info("no validation ran: validating the final weights for %s", objective)
                trainer.validate(module, datamodule=datamodule, verbose=False)
                metrics.update(scalars(trainer.callback_metrics))
                sweeps.report(best_val_bpd=best_score(trainer, metrics.get("val/bpd")))
            if cfg.get("test"):
                metrics.update(score_test_set(trainer, module, datamodule))
                sweeps.report(test_bpd=metrics.get("test/bpd"))
        except SIGTERMException:  # Lightning's stop at a step boundary, in training or testing
            raise stop.stopped() from None
    value = metrics.get(objective)
    sweeps.report(objective=value)
    broken = [k for k in (objective, "test/bpd") if k in metrics and not math.isfinite(metrics[k])]
    if broken:
        raise RunDiverged(
            f"{broken[0]}={metrics[broken[0]]}: the run diverged (its last state is in "
            f"{run_folder.last_checkpoint(cfg.paths.output_dir)}); lower model.lr or model.skip_threshold"
        )
    return value


def scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def best_score(trainer, also: float | None = None) -> float | None:
    """The best val/bpd so far: the best checkpoint's, or `also` (a final validation's) where lower."""
    callback = trainer.checkpoint_callback
    scores = (
        [float(callback.best_model_score)] if callback is not None and callback.best_model_score is not None else []
    )
    scores += [also] if also is not None else []
    finite = [s for s in scores if math.isfinite(s)]
    return min(finite) if finite else (scores[0] if scores else None)


def score_test_set(trainer, module, datamodule) -> dict:
    """Score the best checkpoint (the final weights without one) on the test set; its test/* metrics."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if "test/bpd" in metrics:
        log.info(
            "test metrics (per-group KL in the loggers and images/):\n%s",
            format_table({k: v for k, v in metrics.items() if k.startswith("test/")}),
        )
        log.info(
            "test: %.4f bits/dim (ELBO, %d images), checkpoint %s",
            metrics["test/bpd"],
            int(metrics.get("test/n_images", 0)),
            best or "final weights",
        )
    return metrics
