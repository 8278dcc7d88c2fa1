"""A run's folder and its layout: the one place that knows where a run keeps what.

    <run>/.run_id                the run's identity: only the run it names writes into the folder
    <run>/.hydra/config.yaml     the config the run started with (it marks the folder as a run's)
    <run>/<task>.log             the log
    <run>/checkpoints/last.ckpt  the latest state; best-*.ckpt beside it

The folder of the running job is Hydra's output directory, and paths are compared as Hydra makes it:
made absolute and normalised by their text (`normalised`), so that `<folder>/nope/..` is `<folder>`.
"""

import os
import re
import secrets
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
IDENTITY = ".run_id"

# This process's job: its run folder and the identity it writes there (set as the job starts), or None.
_own: tuple[Path, str] | None = None


def normalised(path) -> Path:
    """`path` made absolute and normalised by its text, as Hydra makes its output directory (no `~`)."""
    return Path(os.path.abspath(str(path)))


def launcher_job_name() -> str | None:
    """The name every process of a multi-process job finds alike, and its restarted self again:
    `torchrun-<rendezvous id>` under torchrun, `slurm-<job>[_<array task>]` inside a SLURM job; else None.
    torchrun's rendezvous id is `none` unless given, which names no run."""
    rendezvous = os.environ.get("TORCHELASTIC_RUN_ID")  # (first: two torchruns in one SLURM job are two runs)
    if rendezvous and rendezvous != "none":  # (`none` is refused where processes must agree: config.check_trainer)
        return "torchrun-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", rendezvous)[:100]
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    return None


def process_rank() -> int:
    """This process's global rank in a multi-process job (torchrun's RANK, else srun's SLURM_PROCID), 0
    in a job of one process; Lightning's own DDP processes are told theirs by Lightning."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def new_identity() -> str:
    """A run's identity: the launcher's job name (its requeued or restarted self is the same run), else random."""
    return launcher_job_name() or secrets.token_hex(8)


def identity_of(folder) -> str | None:
    """The identity written in `folder`, or None where it holds none (or no folder)."""
    try:
        with open(Path(str(folder)) / IDENTITY, "rb") as file:
            return file.read(200).decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def is_empty(folder) -> bool:
    """Whether `folder` does not exist, or is a folder with nothing in it."""
    path = Path(str(folder))
    return not (path.exists() or path.is_symlink()) or (path.is_dir() and not any(path.iterdir()))


def holds_only_further_ranks_logs(folder) -> bool:
    """Whether all `folder` holds is the logs of a job's further ranks (`<task>_rank<N>.log`), which start
    beside rank 0 and may write before rank 0 claims the folder."""
    path = Path(str(folder))
    names = [p.name for p in path.iterdir()] if path.is_dir() and not path.is_symlink() else []
    return bool(names) and all(re.fullmatch(r"\w+_rank[1-9]\d*\.log", name) for name in names)


def unclaim(folder):
    """Remove `folder` if all it holds is a run's identity (a sweep refused before its first job)."""
    path = Path(str(folder))
    if path.is_dir() and not path.is_symlink() and [p.name for p in path.iterdir()] == [IDENTITY]:
        (path / IDENTITY).unlink()
        path.rmdir()


def claim(folder, identity: str) -> bool:
    """Write `identity` into `folder` unless it names a run already: whether the folder is now that run's
    (it named none, or this one). The write is exclusive: of two runs claiming one folder, one wins."""
    path = normalised(folder)
    try:
        descriptor = os.open(path / IDENTITY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return identity_of(path) == identity
    with os.fdopen(descriptor, "w") as file:
        file.write(identity + "\n")
    return True


def own(folder, identity: str):
    """Note `folder`, claimed with `identity`, as this process's job's."""
    global _own
    _own = (normalised(folder), identity)


def own_identity() -> str | None:
    """The identity of this process's run: the one its job claimed, or, in a further rank of a
    multi-process run, the one its folder holds."""
    folder = current()
    if _own is not None and folder is not None and normalised(folder) == _own[0]:
        return _own[1]
    return identity_of(folder) if folder is not None else None


def owns(folder) -> bool:
    """Whether `folder` is the one this process's job claimed."""
    return _own is not None and normalised(folder) == _own[0]


def checkpoints(run_dir) -> Path:
    return Path(str(run_dir)) / CHECKPOINT_DIR


def last_checkpoint(run_dir) -> Path:
    return checkpoints(run_dir) / LAST


def holds_a_run(directory) -> bool:
    """Whether `directory` is the run directory of an earlier run (Hydra saved its config there)."""
    return (Path(str(directory)) / ".hydra" / "config.yaml").is_file()


def run_of_checkpoint(ckpt_path) -> Path | None:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.ckpt` with `<run>/.hydra`), if any."""
    if not ckpt_path or str(ckpt_path).startswith("wandb:"):
        return None
    path = normalised(os.path.expanduser(str(ckpt_path)))
    run = path.parent.parent
    if path.parent.name == CHECKPOINT_DIR and holds_a_run(run):
        return run
    return None


def current() -> Path | None:
    """This job's run folder, or None outside a Hydra job."""
    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def log_file() -> Path | None:
    """This job's log file (it may not exist yet), or None outside a Hydra job."""
    folder = current()
    return None if folder is None else folder / f"{HydraConfig.get().job.name}.log"


def overrides() -> list[str]:
    """The overrides this job was started with ([] outside a Hydra job)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
