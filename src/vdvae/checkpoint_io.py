"""Checkpoints are written to a temporary file and renamed into place: never left half-written. A save
also removes the temporary files that interrupted saves (kill -9, out of memory) left behind. Every
torch file is read weights-only."""

import os
import re
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def load_weights_only(path, what: str, error_type: type[Exception] = ValueError):
    """torch.load on the CPU, weights-only (a file is data, never code); a damaged file raises `error_type`
    saying it is not a readable `what`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many types on a damaged file
        raise error_type(f"{path} is not a readable {what} (truncated or corrupt?): {str(error)[:300]}") from error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(directory: Path):
    """Delete `.<name>.tmp<pid>` files whose writing process is gone."""
    for path in directory.glob(".*.tmp*"):
        match = _TMP.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        # Checkpoints are data: whatever the caller or torch's default says, nothing is unpickled as code.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
