"""Loading checkpoints for resuming, evaluation and sampling: local files or W&B artifacts, always
unpickled weights-only (a checkpoint is data, never code), with clear errors for files that are not
checkpoints or do not fit the model."""

from pathlib import Path

from vdvae.checkpoint_io import load_weights_only
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


def load_checkpoint(path) -> dict:
    """torch.load a checkpoint on the CPU, weights-only (a checkpoint is data, never code), explaining failures."""
    p = resolve(path)
    checkpoint = load_weights_only(p, "checkpoint", CheckpointError)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"{p} is not a vdvae checkpoint (no state_dict and hyper_parameters); weights of the "
            f"original VDVAE code are converted with import_original.py"
        )
    return checkpoint


def state_mismatch(expected: dict, found: dict, limit: int = 5) -> str:
    """The first few keys missing, unexpected or of another shape in `found`, or "" if it fits `expected`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def check_resume(path, module) -> dict:
    """The checkpoint to resume `module`'s training from, read weights-only, after checking that it is one
    and that its weights fit the model (the first few mismatched keys are named)."""
    checkpoint = load_checkpoint(path)
    mismatch = state_mismatch(module.state_dict(), checkpoint["state_dict"])
    if mismatch:
        raise CheckpointError(
            f"{path} does not fit the configured model ({mismatch}). Resume with the model config it was "
            f"trained with (its .hydra/config.yaml), or start a new run without ckpt_path"
        )
    return checkpoint


def load_module(path, **evaluation) -> tuple[VDVAEModule, dict]:
    """The VDVAEModule stored in a checkpoint (in eval mode), and the checkpoint itself; `evaluation`: the
    module's test-set extras (iw_samples, iw_chunk, active_units, variate_masks)."""
    checkpoint = load_checkpoint(path)
    return module_from_checkpoint(checkpoint, path, **evaluation), checkpoint


def module_from_checkpoint(checkpoint: dict, path, **evaluation) -> VDVAEModule:
    """The VDVAEModule of a checkpoint read by `load_checkpoint` (in eval mode); `path` names it in errors."""
    try:
        module = VDVAEModule(**checkpoint["hyper_parameters"], **evaluation)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its hyperparameters do not describe a model: {str(error)[:300]}") from error
    mismatch = state_mismatch(module.state_dict(), checkpoint["state_dict"])
    if mismatch:
        raise CheckpointError(f"{path}: its weights do not fit the model its hyperparameters describe ({mismatch})")
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
