"""Hydra's submitit SLURM launcher, whose jobs fail alone.

Hydra's launcher collects its jobs' results one after another and raises at the first job that left
none: a job killed outside Python (the out-of-memory killer, SIGKILL, a failed node) loses the results
of the whole batch, and the sweep ends with a traceback and no summary. This launch submits the jobs as
Hydra's does (the same options, each job run by Hydra's job function) and collects every result: a job
that left none is recorded as crashed (`vdvae.errors.JobDied`) with its SLURM state, its output and the
checkpoint that resumes it, and every other job comes back as it ended.

A job whose node failed is requeued by SLURM (where the cluster requeues jobs) and runs again, resuming
from its last.ckpt, as soon as the partition has the nodes; where it has not (the job waits `STRANDED_S`
for nodes that are down or drained), the job is cancelled and recorded as crashed, with the command that
resumes it on the cluster, and the sweep goes on.
"""

import logging
import subprocess
import time
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

try:  # the slurm extra (pip install '.[slurm]'); Hydra imports this module for every command
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
except ImportError:
    submitit_launcher = None

from hydra_plugins.vdvae_sweepers import jobs
from vdvae.errors import one_line, refuse
from vdvae.slurm import on_the_cluster, stranded

log = logging.getLogger(__name__)

STRANDED_S = 30  # how long a requeued job may wait for nodes the partition lacks before it is cancelled


class SlurmLauncher(submitit_launcher.SlurmLauncher if submitit_launcher else object):
    def launch(self, job_overrides, initial_job_idx) -> list[JobReturn]:
        import submitit  # here, as Hydra's launcher does: every command imports this module

        options = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=options.pop("submitit_folder"),
            cluster="slurm",
            slurm_max_num_timeout=options.pop("max_num_timeout", 0),
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # every cluster's options; the rest are SLURM's
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in options.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        numbers = [initial_job_idx + i for i in range(len(job_overrides))]
        overrides = [list(o) for o in job_overrides]
        for number, job in zip(numbers, overrides, strict=True):
            log.info("\t#%d : %s", number, " ".join(filter_overrides(job)))
        state, n = Singleton.get_state(), len(numbers)
        ids = [f"job_id_for_{number}" for number in numbers]
        try:
            submitted = executor.map_array(self, overrides, ["hydra.sweep.dir"] * n, numbers, ids, [state] * n)
        except submitit.core.utils.FailedJobError as error:  # sbatch refused: no controller, a wrong partition
            refuse(f"hydra/launcher=slurm: SLURM did not take the jobs: {one_line(error, 1000)}")
        return [self._result(*job) for job in zip(submitted, overrides, numbers, strict=True)]

    def _result(self, job, overrides: list, number: int) -> JobReturn:
        """The job's JobReturn, or, where it left none, its death recorded (`jobs.died`)."""
        import submitit

        reason = self._wait(job)
        if reason:
            what = f"was requeued (a node failed) and waited {STRANDED_S} s for nodes its partition lacks "
            what += f"({reason}): cancelled"
        else:
            try:
                return job.results()[0]
            except submitit.core.utils.UncompletedJobError:
                what = f"ended with no result (SLURM state {job.state}; killed outside Python: out of memory, "
                what += "SIGKILL or a failed node)"
            except submitit.core.utils.FailedJobError:
                what = "failed outside the run (see its output)"
        what = f"SLURM job {job.job_id} {what}"
        return jobs.died(self, overrides, number, job.job_id, what, job.paths.stderr, self._cluster())

    @staticmethod
    def _wait(job) -> str | None:
        """Wait for the job to end; where it is stranded (`stranded`) for STRANDED_S, cancel it: SLURM's reason."""
        since = None
        while not job.done():
            reason = stranded(job.job_id)
            since = (since or time.monotonic()) if reason else None
            if reason and time.monotonic() - since > STRANDED_S:
                try:  # (only while it still waits: one that started meanwhile runs on)
                    subprocess.run(["scancel", "--state=PENDING", job.job_id], capture_output=True, timeout=60)
                except (OSError, subprocess.SubprocessError) as error:
                    log.warning("could not cancel SLURM job %s: %s", job.job_id, error)
                    continue
                if not job.done():
                    return reason
            time.sleep(2)
        return None

    def _cluster(self) -> list[str]:
        """The overrides that resume a job of several nodes on the cluster ([] for one node, which resumes
        anywhere): this sweep's launcher."""
        if int(self.params.get("nodes") or 1) <= 1:
            return []
        return on_the_cluster(self.config.hydra.overrides.hydra)
