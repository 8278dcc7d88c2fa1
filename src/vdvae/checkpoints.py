"""Checkpoints as data: written atomically (to a temporary file renamed into place, never left
half-written; a save also removes what interrupted saves left behind), always read weights-only (a
checkpoint never names code to run), from local files or W&B artifacts, with clear errors for files that
are not checkpoints or do not fit the model; and the data module a checkpoint was trained on.

Reading and checking a checkpoint needs torch alone, not Lightning: the commands check the checkpoint a
request names before they load the rest, so that a wrong file is refused in seconds.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from vdvae.data import check_stored_data_config
from vdvae.errors import one_line
from vdvae.files import remove_stale_temp_files, write_atomically

if TYPE_CHECKING:
    from vdvae.data import ImageDataModule
    from vdvae.lit_module import VDVAEModule

# The reason inside torch's refusal of a file that is not plain data (its advice to load the file with
# weights_only=False, which would run what the file names, is left out).
_REFUSED_CODE = re.compile(r"(Trying to load unsupported GLOBAL[^\n]*)")
_REFUSED_OTHER = re.compile(r"WeightsUnpickler error:\s*(.*?)\s*Check the documentation", re.DOTALL)


def load_weights_only(path, what: str, error_type: type[Exception] = ValueError, mmap: bool = False):
    """torch.load on the CPU, weights-only (a file is data, never code); a damaged file raises `error_type`
    saying it is not a readable `what`. `mmap`: map the tensors' storage instead of reading it (shapes and
    structure at once; the data is read where it is used), for files in torch's zip format."""
    import torch  # here, not above: a wrong path is reported without waiting for torch to load

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many types on a damaged file
        text = str(error)
        if code := _REFUSED_CODE.search(text):
            why = f": it asks to run code, which is never loaded ({code.group(1).strip()})"
        else:
            other = _REFUSED_OTHER.search(text)
            why = f" (truncated or corrupt?): {(other.group(1) if other else text)[:300]}"
        raise error_type(f"{path} is not a readable {what}{why}") from error


def save_atomically(checkpoint: dict, path):
    """torch.save to a temporary file renamed into place (vdvae.files): readers see the old file or the new
    one, also after a crash of the machine; a save also removes what interrupted saves left behind."""
    import torch

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)
        write_atomically(path, lambda file: torch.save(checkpoint, file))
    except (OSError, RuntimeError) as error:  # torch.save reports an unwritable file as a RuntimeError
        raise OSError(
            f"cannot save the checkpoint {path}: {one_line(error, 300)}. Check that "
            f"{path.parent} is writable and its disk has room"
        ) from error


def check_writable(folder):
    """A file can be made in `folder` (made if missing): a run whose checkpoints could not be saved stops
    before training, not at its first save."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(
            f"cannot write checkpoints into {folder} ({error.strerror or error}): make it writable, or run "
            f"elsewhere (hydra.run.dir=...)"
        ) from error


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


# The file this process read last, by identity, and what it holds: the checks before a run and the run
# itself read a checkpoint once. Treat what `load_checkpoint` returns as read-only.
_last_read: tuple = (None, None)


def load_checkpoint(path) -> dict:
    """torch.load a checkpoint on the CPU, weights-only (a checkpoint is data, never code), explaining failures.
    Its tensors are mapped, not read (see `load_weights_only`); an unchanged file is read once per process."""
    global _last_read
    p = resolve(path)
    stat = p.stat()
    identity = (str(p.absolute()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _last_read[0] != identity:
        checkpoint = load_weights_only(p, "checkpoint", CheckpointError, mmap=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise CheckpointError(
                f"{p} is not a vdvae checkpoint (no state_dict and hyper_parameters); weights of the "
                f"original VDVAE code are converted with import_original.py"
            )
        _last_read = (identity, checkpoint)
    return _last_read[1]


def state_mismatch(expected: dict, found: dict, limit: int = 5) -> str:
    """The first few keys missing, unexpected or of another shape in `found`, or "" if it fits `expected`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)
    ]
    # A tensor that holds no data on the CPU (meta, sparse), or of another dtype, is no weight of the model.
    kinds = [
        f"{k} ({getattr(found[k], 'dtype', type(found[k]).__name__)}, {getattr(found[k], 'device', '')})"
        for k, v in expected.items()
        if k in found and not _holds_like(found[k], v)
    ]
    parts = []
    for name, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", shapes),
        ("not dense CPU tensors of the model's dtype", kinds),
    ):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def _holds_like(tensor, like) -> bool:
    return (
        hasattr(tensor, "is_meta")
        and not tensor.is_meta
        and tensor.device.type == "cpu"
        and tensor.layout == like.layout
        and tensor.dtype == like.dtype
    )


def check_checkpoint(path, stored_data: bool) -> dict:
    """The checkpoint at `path`, its tensors mapped (not read), after checking that it is one and, where
    `stored_data` (the data it was trained on will be used), that its data config is plain data."""
    checkpoint = load_checkpoint(path)
    if stored_data and "data_config" in checkpoint:
        try:
            check_stored_data_config(checkpoint["data_config"])
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from error
    return checkpoint


def load_module(path, **evaluation) -> tuple[VDVAEModule, dict]:
    """The VDVAEModule stored in a checkpoint (in eval mode), and the checkpoint itself; `evaluation`: the
    module's test-set extras (iw_samples, iw_chunk, active_units, variate_masks)."""
    checkpoint = load_checkpoint(path)
    return module_from_checkpoint(checkpoint, path, **evaluation), checkpoint


def module_from_checkpoint(checkpoint: dict, path, **evaluation) -> VDVAEModule:
    """The VDVAEModule of a checkpoint read by `load_checkpoint` (in eval mode); `path` names it in errors."""
    import torch

    from vdvae.lit_module import VDVAEModule

    hyper_parameters = checkpoint["hyper_parameters"]
    _check_block_count(hyper_parameters, len(checkpoint["state_dict"]), path)
    # Its shapes first, on the meta device (no memory): a file of kilobytes may describe a model of gigabytes.
    try:
        with torch.device("meta"):
            mismatch = state_mismatch(
                VDVAEModule(**hyper_parameters, **evaluation).state_dict(), checkpoint["state_dict"]
            )
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path}: its hyperparameters do not describe a model: {str(error)[:300]}") from error
    if mismatch:
        raise CheckpointError(f"{path}: its weights do not fit the model its hyperparameters describe ({mismatch})")
    module = VDVAEModule(**hyper_parameters, **evaluation)

    broken = [
        k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} of its weight tensors hold NaN or inf (first: {broken[0]}): the run had "
            f"diverged when it was saved; use an earlier checkpoint of the run (its best-*.ckpt)"
        )
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def _check_block_count(hyper_parameters, n_tensors: int, path):
    """Every block the block strings name holds a weight tensor: more blocks than the file has tensors is
    refused before anything is built (a block string of 100,000 blocks in a file of kilobytes)."""
    from vdvae.model.blocks import parse_block_string

    vae = hyper_parameters.get("vae") if isinstance(hyper_parameters, dict) else None
    if not isinstance(vae, dict):
        return  # the module's constructor names what is missing
    try:
        blocks = sum(
            len(parse_block_string(vae[k], kind)) for k, kind in (("enc_blocks", "encoder"), ("dec_blocks", "decoder"))
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: its hyperparameters do not describe a model: {str(error)[:300]}") from error
    if blocks > n_tensors:
        raise CheckpointError(
            f"{path}: its hyperparameters name {blocks:,} blocks, its weights hold {n_tensors:,} tensors: the file "
            f"is damaged or not a vdvae checkpoint"
        )


def data_module(checkpoint: dict, path, data: DictConfig | None = None, **overrides) -> tuple[ImageDataModule, dict]:
    """The data module of `data` if given (data=..., the user's own config), else the one the checkpoint
    at `path` was trained on (plain values checked by `data_module_from_config`: a checkpoint never names
    code to run); and its config as a plain dict."""
    from hydra.utils import instantiate

    from vdvae.data import data_module_from_config

    if data is not None:
        return instantiate(data, **overrides), OmegaConf.to_container(data, resolve=True)
    if "data_config" not in checkpoint:
        raise ValueError(f"{path} does not say which data it was trained on: pass data=<name>")
    config = checkpoint["data_config"]
    try:
        return data_module_from_config(config, **overrides), config
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error
