"""Hydra's submitit SLURM launcher, whose jobs fail alone.

Hydra's launcher collects its jobs' results one after another and raises at the first job that left
none: a job killed outside Python (the out-of-memory killer, SIGKILL, a failed node) loses the results
of the whole batch, and the sweep ends with a traceback and no summary. This launch submits the jobs as
Hydra's does (the same options, each job run by Hydra's job function) and collects every result: a job
that left none is recorded as crashed (`vdvae.errors.JobDied`) with its SLURM state, its output and the
checkpoint that resumes it, and every other job comes back as it ended.
"""

import logging
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

log = logging.getLogger(__name__)


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
        submitted = executor.map_array(self, overrides, ["hydra.sweep.dir"] * n, numbers, ids, [state] * n)
        return [self._result(*job) for job in zip(submitted, overrides, numbers, strict=True)]

    def _result(self, job, overrides: list, number: int) -> JobReturn:
        """The job's JobReturn, or, where it left none, its death recorded (`jobs.died`)."""
        import submitit

        try:
            return job.results()[0]
        except submitit.core.utils.UncompletedJobError:
            what = f"ended with no result (SLURM state {job.state}; killed outside Python: out of memory, "
            what += "SIGKILL or a failed node)"
        except submitit.core.utils.FailedJobError:
            what = "failed outside the run (see its output)"
        what = f"SLURM job {job.job_id} {what}"
        return jobs.died(self, overrides, number, job.job_id, what, job.paths.stderr)
