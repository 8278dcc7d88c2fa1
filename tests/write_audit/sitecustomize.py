"""Which process writes which file, for tests/test_slurm_2nodes.py: with this folder on PYTHONPATH and
VDVAE_WRITE_AUDIT naming a folder, every Python process of a job appends a line `<who> <event> <path>` to
`<that folder>/<pid>.txt` for each file it opens for writing, renames onto or removes, and each folder it
makes (Python's audit events: every write of Python code and of the libraries written in it). `<who>` is the process's
rank in its SLURM job (`rank<SLURM_PROCID>`), else `driver`."""

import os
import sys

_AUDIT = os.environ.get("VDVAE_WRITE_AUDIT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _start():
    who = f"rank{os.environ['SLURM_PROCID']}" if os.environ.get("SLURM_JOB_ID") else "driver"
    record = open(os.path.join(_AUDIT, f"{os.getpid()}.txt"), "a", buffering=1)  # before the hook: not audited
    busy = []

    def written(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in (mode or "") for c in "wax+") or (flags or 0) & _WRITE_FLAGS):
                return None
        elif event in ("os.rename", "os.replace"):
            path = args[1]
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            path = args[0]
        elif event == "os.mkdir":  # (a folder that exists already is not made again)
            path = None if os.path.isdir(args[0]) else args[0]
        else:
            return None
        return path if isinstance(path, (str, bytes, os.PathLike)) else None

    def hook(event, args):
        if busy:
            return
        path = written(event, args)
        if path is None:
            return
        busy.append(1)
        try:
            record.write(f"{who} {event} {os.path.abspath(os.fsdecode(path))}\n")
        finally:
            busy.pop()

    sys.addaudithook(hook)


if _AUDIT:
    _start()
