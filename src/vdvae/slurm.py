"""SLURM pre-emption and time limits under the submitit launcher: save, requeue, resume.

submitit asks SLURM for USR2 shortly before the time limit (and SLURM sends it on pre-emption); in the
job, submitit's own USR2 handler checkpoints the job (Hydra's launcher resubmits it with its original
overrides, into the same run directory) and requeues it at once, wherever training is. The run's stop
controller (vdvae.lifecycle.StopController) turns USR2 into Lightning's SIGTERM path instead: every rank
stops at the next step boundary and `last.ckpt` is saved; then submitit's handler runs, from ordinary
code, to requeue the job. The requeued job finds `last.ckpt` in its run directory and resumes from it
(vdvae.resume). SIGTERM (scancel, `scontrol requeue`, pre-emption without a signal of its own) stops and
saves the same way; where SLURM is not requeueing the job (`slurm_requeues_this_job`), the job then fails
with `JobEnded` (the sweep reports it at once, with the checkpoint that resumes it), instead of leaving no
result for submitit to find. submitit owns requeueing: Lightning's own (its SLURM environment's
`auto_requeue`) is off (`cluster_environment`, a plugin of every trainer config).

The launcher's resources follow the trainer (conf/hydra/launcher/slurm.yaml, resolver `vdvae.slurm` of
vdvae.config): one task per device on each of `trainer.num_nodes` nodes; GPUs only where
`trainer.accelerator` is gpu or cuda.
"""

import os
import re
import subprocess


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
