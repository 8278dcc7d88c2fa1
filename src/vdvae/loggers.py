"""Weights & Biases: online when the user has credentials, offline (synced later) otherwise, never prompting."""

import logging
import netrc
import os

from lightning.pytorch.loggers import WandbLogger

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


def wandb_logger(
    save_dir: str, project: str = "vdvae", mode: str | None = None, log_model: bool | None = None, **kwargs
) -> WandbLogger:
    """A WandbLogger; `mode` (or WANDB_MODE) "online"/"offline", else online exactly when credentials exist.

    When online, checkpoints are uploaded as artifacts (`log_model`).
    """
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode must be online, offline or disabled, got {mode!r}")
    os.makedirs(save_dir, exist_ok=True)
    if mode != "online":
        log.info("W&B %s: runs are kept in %s/wandb; `wandb sync` uploads them later", mode, save_dir)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        mode=mode,
        log_model=(mode == "online") if log_model is None else log_model,
        **kwargs,
    )
