"""The evaluation recipe: load a checkpoint, score the test set (every image once, on any number of
devices), print a table, write eval.json in the run directory and log to the configured loggers."""

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vdvae.checkpoints import load_module
from vdvae.train import check_config, remove_empty_run_dir

log = logging.getLogger(__name__)


def data_config(cfg: DictConfig, checkpoint: dict) -> DictConfig:
    """The data of the config if given (data=...), else the one the checkpoint was trained on."""
    if cfg.get("data") is not None:
        return cfg.data
    if "data_config" not in checkpoint:
        raise ValueError(f"{cfg.ckpt_path} does not say which data it was trained on: pass data=<name>")
    return OmegaConf.create(checkpoint["data_config"])


def format_table(metrics: dict) -> str:
    rows = [(k, f"{v:.5g}") for k, v in sorted(metrics.items()) if "/group_" not in k]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>12}" for k, v in rows)


def evaluate(cfg: DictConfig) -> dict:
    try:
        module, checkpoint = load_module(cfg.ckpt_path, weights_only=cfg.weights_only)
        data = data_config(cfg, checkpoint)
        with_data = OmegaConf.create({"model": {"vae": module.hparams.vae}, "data": data})
        check_config(with_data)
        datamodule = instantiate(
            data, batch_size=cfg.batch_size or data.batch_size, eval_batch_size=cfg.batch_size or data.eval_batch_size
        )
        datamodule.setup("test")
    except Exception:
        remove_empty_run_dir()
        raise
    module.enable_evaluation(cfg.iw_samples, cfg.iw_chunk, cfg.active_units)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["test/nats_per_dim"] = metrics.pop("test/loss")
    if trainer.global_rank == 0:
        out = Path(HydraConfig.get().runtime.output_dir) / "eval.json"
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
        out.write_text(json.dumps(report, indent=1))
        print(format_table(metrics))
        log.info("wrote %s", out)
    return metrics
