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

# Why a pending job waits, where the partition lacks the nodes it needs (down or drained: a node failed).
LACKING_NODES = ("ReqNodeNotAvail", "Nodes_required_for_job_are_DOWN")


def shown_job(job: str) -> dict[str, str]:
    """The fields `scontrol show job` gives for `job` ({} where it gives none)."""
    try:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"\b(\w+)=(\S*)", shown.stdout)) if shown.returncode == 0 else {}


def slurm_requeues_this_job() -> tuple[bool | None, str]:
    """Whether SLURM is requeueing this job (its restart count is past the one the job started with), from
    `scontrol show job`; None where scontrol does not say. Also the job's state, as scontrol gives it."""
    fields = shown_job(os.environ.get("SLURM_JOB_ID", ""))
    state = f"JobState={fields['JobState']}" if "JobState" in fields else "unknown"
    if not fields.get("Restarts", "").isdigit():
        return None, state
    return int(fields["Restarts"]) > int(os.environ.get("SLURM_RESTART_COUNT") or 0), state


def usable_nodes(partition: str) -> int | None:
    """How many nodes of `partition` can run jobs (not down, drained, failed or in maintenance), from
    sinfo; None where sinfo does not say."""
    try:
        shown = ["sinfo", "-h", "-p", partition, "-o", "%D %T"]
        shown = subprocess.run(shown, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if shown.returncode != 0:
        return None
    lines = [line.split() for line in shown.stdout.splitlines() if len(line.split()) == 2]
    unusable = ("down", "drain", "fail", "maint", "future", "unknown", "not_responding", "inval")
    return sum(int(n) for n, state in lines if n.isdigit() and not state.strip("*~#!%$@^-").startswith(unusable))


def stranded(job: str) -> str | None:
    """Where SLURM requeued `job` after it ran and it now waits for more nodes than its partition has that
    can run jobs (the others down or drained: a node failed): why, in words; else None."""
    fields = shown_job(job)
    reason = fields.get("Reason", "")
    if fields.get("JobState") != "PENDING" or fields.get("Restarts", "0") == "0" or "Reserved" in reason:
        return None
    if not reason.startswith(LACKING_NODES) or not fields.get("NumNodes", "").split("-")[0].isdigit():
        return None
    needed, usable = int(fields["NumNodes"].split("-")[0]), usable_nodes(fields.get("Partition", ""))
    if usable is None or usable >= needed:
        return None
    return f"{reason.replace('_', ' ')}; it needs {needed} nodes, partition {fields.get('Partition')} has {usable} up"


def on_the_cluster(hydra_overrides) -> list[str]:
    """What makes a resume command a job of the cluster a sweep ran on: `-m` and the sweep's launcher
    overrides (hydra/launcher=slurm, hydra.launcher.partition=...), from its Hydra overrides."""
    return ["-m", *(str(o) for o in hydra_overrides if str(o).startswith(("hydra/launcher=", "hydra.launcher.")))]


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
