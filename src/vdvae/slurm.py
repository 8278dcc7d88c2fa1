"""SLURM pre-emption and time limits under the submitit launcher: save, requeue, resume.

submitit asks SLURM for USR2 shortly before the time limit (and SLURM sends it on pre-emption); in the
job, submitit's own USR2 handler checkpoints the job (Hydra's launcher resubmits it with its original
overrides, into the same run directory) and requeues it at once, wherever training is. Here USR2 is
turned into Lightning's SIGTERM path instead: every rank stops at the next step boundary and
`last.ckpt` is saved; then submitit's handler runs, from ordinary code, to requeue the job. The
requeued job finds `last.ckpt` in its run directory and resumes from it (vdvae.tasks.train).
SIGTERM (scancel, `scontrol requeue`, pre-emption without a signal of its own) stops and saves the
same way; where SLURM is not requeueing the job, the job then fails with `JobEnded` (the sweep
reports it at once, with the checkpoint that resumes it), instead of leaving no result for submitit to
find. submitit owns requeueing: Lightning's own (its SLURM environment's `auto_requeue`) is off
(`cluster_environment`, a plugin of every trainer config).

The launcher's resources follow the trainer (conf/hydra/launcher/slurm.yaml, resolver `vdvae.slurm`,
registered on import): one task per device on each of `trainer.num_nodes` nodes; GPUs only where
`trainer.accelerator` is gpu or cuda.
"""

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from vdvae.sweeps import resume_hint

log = logging.getLogger(__name__)


class JobEnded(RuntimeError):
    """SLURM stopped the job (SIGTERM) and will not requeue it: scancel, or its time limit."""


class RequeueOnSignal:
    """While installed, `signum` makes the training stop and save; `requeue()` then hands the signal to
    the handler that was there before (submitit's). Installed only where such a handler exists. It also
    notes SIGTERM, after which `requeue()` raises `JobEnded` unless SLURM is requeueing the job."""

    def __init__(self, signum=signal.SIGUSR2):
        self.signum, self.caught = signum, None
        self.previous = signal.getsignal(signum)
        self.active = callable(self.previous) and bool(os.environ.get("SLURM_JOB_ID"))
        if self.active:
            signal.signal(signum, self._handle)
            self.previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._note_sigterm)  # Lightning's handler calls it too
            log.info(
                "SLURM job %s, SLURM_RESTART_COUNT=%s: %s saves last.ckpt and requeues the job",
                os.environ["SLURM_JOB_ID"],
                os.environ.get("SLURM_RESTART_COUNT", "0"),
                signal.Signals(signum).name,
            )

    def _handle(self, signum, frame):
        log.warning("%s: stopping at the next step to save, then requeueing", signal.Signals(signum).name)
        self.caught = (signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own stop: at a step boundary, on every rank

    def _note_sigterm(self, signum, frame):
        if self.caught is None:  # not the SIGTERM that USR2 sends
            self.caught = (signum, frame)
        if callable(self.previous_sigterm):
            self.previous_sigterm(signum, frame)

    def requeue(self):
        """After USR2: run the previous handler (submitit: checkpoint the job, requeue it, exit). After
        SIGTERM: return where SLURM requeues the job (or cannot say), else raise `JobEnded`."""
        signum, frame = self.caught
        if signum == self.signum:
            signal.signal(self.signum, self.previous)
            self.previous(signum, frame)
            return
        requeued, state = slurm_requeues_this_job()
        if requeued is False:
            raise JobEnded(
                f"SLURM stopped job {os.environ['SLURM_JOB_ID']} without requeueing it ({state}: scancel, or its "
                f"time limit); {resume_hint(*_this_run())}"
            )


def slurm_requeues_this_job() -> tuple[bool | None, str]:
    """Whether SLURM is requeueing this job (its restart count is past the one the job started with), from
    `scontrol show job`; None where scontrol does not say. Also the job's state, as scontrol gives it."""
    job = os.environ.get("SLURM_JOB_ID", "")
    try:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None, "unknown"
    restarts = re.search(r"\bRestarts=(\d+)", shown.stdout)
    state = re.search(r"\bJobState=(\S+)", shown.stdout)
    state = f"JobState={state.group(1)}" if state else "unknown"
    if shown.returncode != 0 or restarts is None:
        return None, state
    return int(restarts.group(1)) > int(os.environ.get("SLURM_RESTART_COUNT") or 0), state


def _this_run() -> tuple[Path | None, list[str]]:
    from hydra.core.hydra_config import HydraConfig

    try:
        config = HydraConfig.get()
    except ValueError:  # not under Hydra
        return None, []
    return Path(config.runtime.output_dir), list(config.overrides.task)


GPU_ACCELERATORS = ("gpu", "cuda")


def devices_per_node(accelerator, devices) -> int:
    """How many devices (and so tasks: one process each) `trainer.devices` asks for on each node."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if str(accelerator) not in GPU_ACCELERATORS:
        return 1  # `auto` on the CPU: one process
    raise ValueError(
        f"trainer.devices={devices!r} with trainer.accelerator={accelerator}: under hydra/launcher=slurm, say how "
        f"many GPUs each node gets (e.g. trainer.devices=4), which the job asks SLURM for"
    )


def launcher_default(key: str, accelerator, devices):
    """A SLURM resource of the job, from the trainer: one task per device; on GPUs (trainer.accelerator gpu or
    cuda) as many GPUs, 8 CPUs a task and 64 GB a node; otherwise no GPU, 1 CPU and 4 GB a task."""
    n = devices_per_node(accelerator, devices)
    on_gpus = str(accelerator) in GPU_ACCELERATORS
    values = {
        "tasks_per_node": n,
        "gpus_per_node": n if on_gpus else None,
        "cpus_per_task": 8 if on_gpus else 1,
        "mem_gb": 64 if on_gpus else 4 * n,
    }
    return values[key]


def cluster_environment():
    """The cluster environment Lightning picks itself (its order: TorchElastic, SLURM, LSF, MPI, else one
    machine), except that under SLURM its own requeueing is off: submitit requeues (see above)."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for kind in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if kind.detect():
            return SLURMEnvironment(auto_requeue=False) if kind is SLURMEnvironment else kind()
    return LightningEnvironment()


OmegaConf.register_new_resolver("vdvae.slurm", launcher_default, replace=True)
