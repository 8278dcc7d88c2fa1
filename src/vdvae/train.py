"""The training recipe: check the config, load the data, build module, callbacks, loggers and
trainer from the config, fit, test, and return the metric a sweep optimizes."""

import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The composed config is inconsistent; the message names the options involved."""


def check_config(cfg: DictConfig):
    """Model and data must agree on the image shape, bit depth and likelihood, before any work starts."""
    vae, data = cfg.model.vae, cfg.data
    pairs = [("image_size", "image_size"), ("image_channels", "channels"), ("bits", "bits")]
    for model_key, data_key in pairs:
        if vae[model_key] != data[data_key] and not (model_key == "bits" and data.binarize):
            raise ConfigError(
                f"model.vae.{model_key}={vae[model_key]} does not match data.{data_key}={data[data_key]}: "
                f"pick a model preset made for this data, or override one of the two"
            )
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    if precision.startswith("16") or precision == "transformer-engine":
        raise ConfigError(
            f"trainer.precision={precision} is not supported: fp16 loss scaling would take over the skip decision "
            f"of the fused optimizer; use trainer.precision=bf16-mixed (or 32-true)"
        )
    if bool(data.binarize) != (vae.likelihood == "bernoulli"):
        raise ConfigError(
            f"data.binarize={data.binarize} needs model.vae.likelihood={'bernoulli' if data.binarize else 'dmol'} "
            f"(got {vae.likelihood})"
        )


def remove_empty_run_dir():
    """After a failure before training: delete what Hydra wrote for this run, if that is all there is."""
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        return
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if out.is_dir() and {p.name for p in out.iterdir()} <= own:
        shutil.rmtree(out)


def train(cfg: DictConfig) -> float | None:
    try:
        check_config(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            datamodule.prepare_data()
        datamodule.setup("fit")  # missing or corrupt data fails here, before any output is written
        module = instantiate(cfg.model)
        module.data_config = OmegaConf.to_container(cfg.data, resolve=True)
    except Exception:
        remove_empty_run_dir()
        raise
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = sum(p.numel() for p in module.vae.parameters())
    log.info(
        "%s: %s parameters, %d latent groups; data %s",
        cfg.model.get("_target_"),
        f"{n_params:,}",
        module.vae.n_groups,
        datamodule.name,
    )

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if module.stall_message:
        raise RuntimeError(module.stall_message)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if "test/bpd" in metrics:
            log.info(
                "test: %.4f bits/dim (ELBO, %d images), checkpoint %s",
                metrics["test/bpd"],
                int(metrics.get("test/n_images", 0)),
                best or "final weights",
            )
    return metrics.get(cfg.get("optimized_metric"))
