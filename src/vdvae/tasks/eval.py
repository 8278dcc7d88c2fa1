"""The evaluation recipe: load a checkpoint, score the test set (every image once, on any number of
devices), print a table, write eval.json in the run directory and log to the configured loggers. On a
terminal a bar shows the images scored, images/s and the time left (vdvae.progress; off with
trainer.enable_progress_bar=false); logs and pipes get a line every 30 s."""

import json
import logging
import math

from hydra.utils import instantiate
from omegaconf import DictConfig

from vdvae import run_folder
from vdvae.checkpoints import data_module, load_module, module_from_checkpoint
from vdvae.config import check_model_and_data
from vdvae.data.base import first_images
from vdvae.files import write_atomically
from vdvae.lifecycle import no_run_dir_on_failure, route_library_logs
from vdvae.loggers import request_config, request_loggers
from vdvae.metrics import format_table
from vdvae.progress import advance, progress

log = logging.getLogger(__name__)


def pruned_variates(module, datamodule, quantile: float, n_images: int) -> list:
    """Efficient-VDVAE's latent pruning: masks of the `quantile` most informative variates, measured on
    the first `n_images` validation images."""
    import torch

    from vdvae.lit_module import seeded
    from vdvae.pruning import variate_kl, variate_masks

    images = first_images(datamodule.val_set, n_images)
    n = len(images)
    with seeded(torch.device("cpu"), 0), progress(n, "measuring variates") as bar:
        masks = variate_masks(variate_kl(module.ema, batches_of(images, datamodule, bar)), quantile)
    kept, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    log.info("latent pruning: %d of %d variates kept (quantile %g, %d validation images)", kept, total, quantile, n)
    return masks


def batches_of(images, datamodule, bar, size: int = 100):
    """The images preprocessed, `size` at a time; `bar` advanced as each batch is taken."""
    for start in range(0, len(images), size):
        yield datamodule.preprocess(images[start : start + size])
        advance(bar, len(images[start : start + size]))


def evaluate(cfg: DictConfig) -> dict:
    route_library_logs()
    extras = dict(iw_samples=cfg.iw_samples, iw_chunk=cfg.iw_chunk, active_units=cfg.active_units)
    with no_run_dir_on_failure():
        module, checkpoint = load_module(cfg.ckpt_path, **extras)
        sizes = {"batch_size": cfg.batch_size, "eval_batch_size": cfg.batch_size} if cfg.batch_size else {}
        datamodule, data = data_module(checkpoint, cfg.ckpt_path, cfg.get("data"), **sizes)
        check_model_and_data(module.hparams.vae, data)
        datamodule.setup("test")
    if cfg.prune_quantile:  # the masks come from the model itself: then a module that keeps only them
        masks = pruned_variates(module, datamodule, cfg.prune_quantile, cfg.prune_images)
        module = module_from_checkpoint(checkpoint, cfg.ckpt_path, **extras, variate_masks=masks)
    loggers = request_loggers(cfg.get("logger"), checkpoint, cfg.ckpt_path)
    from vdvae.callbacks import EvaluationProgress

    # Lightning's bar counts batches and writes into logs and pipes: this one counts images, on a terminal only.
    bar = [EvaluationProgress()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=bar, enable_progress_bar=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["test/nats_per_dim"] = metrics.pop("test/loss")
    broken = [k for k, v in metrics.items() if not math.isfinite(v)]
    if broken:
        raise ValueError(
            f"{cfg.ckpt_path} scores {broken[0]}={metrics[broken[0]]} on the test set ({len(broken)} metrics not "
            f"finite): no eval.json written. The model is unstable on this data: try an earlier checkpoint"
        )
    for logger in loggers:  # what was scored: the checkpoint, its step, the run that trained it, the options
        logger.log_hyperparams(request_config(cfg, checkpoint))
    if trainer.global_rank == 0:
        out = run_folder.current() / "eval.json"
        kl = [metrics[k] for k in sorted(metrics) if k.startswith("test/kl/group_")]
        active = [metrics[k] for k in sorted(metrics) if k.startswith("test/active_units/group_")]
        report = {
            "checkpoint": str(cfg.ckpt_path),
            "data": data.get("_target_"),
            "metrics": metrics,
            "kl_per_group_nats": kl,
            "active_units_per_group": active,
            "elbo_bits_per_dim": metrics["test/bpd"],
        }
        write_atomically(out, json.dumps(report, indent=1))
        print(format_table(metrics))
        log.info("wrote %s", out)
    return metrics
