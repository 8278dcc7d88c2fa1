"""Loading checkpoints for evaluation and sampling: local files or W&B artifacts, with safe
(weights-only) unpickling by default and clear errors for files that are not checkpoints."""

from pathlib import Path

import torch

from vdvae.lit_module import VDVAEModule


class CheckpointError(ValueError):
    """The file cannot be used as a checkpoint; the message says why and what to do."""


def resolve(path: str) -> Path:
    """A local path, or `wandb:<entity>/<project>/<artifact>:<version>` downloaded from W&B."""
    if str(path).startswith("wandb:"):
        import wandb

        try:
            directory = Path(wandb.Api().artifact(str(path)[len("wandb:") :], type="model").download())
        except Exception as error:
            raise CheckpointError(
                f"cannot fetch W&B artifact {path!r} (needs `wandb login` and network): {error}"
            ) from error
        files = sorted(directory.glob("*.ckpt"))
        if not files:
            raise CheckpointError(f"W&B artifact {path!r} holds no .ckpt file")
        return files[0]
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path, weights_only: bool = True) -> dict:
    """torch.load a checkpoint on the CPU, explaining failures. `weights_only=False` only for trusted files."""
    p = resolve(path)
    try:
        checkpoint = torch.load(p, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch.load raises many types on a damaged file
        raise CheckpointError(
            f"{p} is not a readable checkpoint (truncated or corrupt?): {str(error)[:300]}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"{p} is not a vdvae checkpoint (no state_dict and hyper_parameters); weights of the "
            f"original VDVAE code are converted with import_original.py"
        )
    return checkpoint


def load_module(path, weights_only: bool = True) -> tuple[VDVAEModule, dict]:
    """The VDVAEModule stored in a checkpoint (in eval mode), and the checkpoint itself."""
    checkpoint = load_checkpoint(path, weights_only)
    try:
        module = VDVAEModule(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its hyperparameters describe: {error}"
        ) from error
    return module.eval(), checkpoint
