"""Outputs that appear whole or not at all: everything this package writes goes to a temporary name beside
its place (`.<name>.tmp<pid>`), reaches the disk, and is renamed into place; an interrupted write leaves
the old output as it was, and a later write removes temporary files whose writer is gone."""

import contextlib
import os
import re
import shutil
from pathlib import Path

_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; on success it replaces `path` (a file or a folder) and the
    folder is synced, on any failure or interrupt it is removed and `path` is left as it was."""
    path = Path(path)
    tmp, aside = temporary_name(path), temporary_name(path, "old")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            os.replace(path, aside)  # no move replaces a folder: the old one steps aside first
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        if (aside.exists() or aside.is_symlink()) and not path.exists():  # stopped between the two moves
            os.replace(aside, path)
        for leftover in (tmp, aside):
            if leftover.exists() or leftover.is_symlink():
                with contextlib.suppress(OSError):  # a folder that refused the output may refuse this too
                    _remove(leftover)


def write_atomically(path, data) -> Path:
    """Write `data` to `path` through a temporary file that reaches the disk, then is renamed into place:
    bytes, a str, or a function that writes into the open (binary) file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w" if isinstance(data, str) else "wb") as file:
            data(file) if callable(data) else file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return Path(path)


def sync_folder(folder):
    """fsync a folder, so that a rename in it survives a crash of the machine (where the file system can)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # a file system that cannot sync folders
        pass
    finally:
        os.close(descriptor)


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
    for path in Path(directory).glob(".*.tmp*"):
        match = _TMP.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
