"""Hydra's submitit SLURM launcher, whose jobs fail alone.

Hydra's launcher collects its jobs' results one after another and raises at the first job that left
none: a job killed outside Python (the out-of-memory killer, SIGKILL, a failed node) loses the results
of the whole batch, and the sweep ends with a traceback and no summary. Here such a job comes back as a
failed job (`vdvae.errors.JobDied`: status crashed in the sweep's summary) that names its SLURM state,
its output and the checkpoint that resumes it; every other job comes back as it ended.
"""

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from hydra_plugins.vdvae_sweepers import jobs


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        import submitit  # here, as Hydra's launcher does: every command imports this module

        # Hydra's launch submits with executor.map_array and then calls results() on each job it
        # returned; for that one call, the jobs it gets are ones whose results() do not raise.
        submit = submitit.AutoExecutor.map_array

        def map_array(executor, fn, overrides, job_dir_key, numbers, *rest):
            submitted = submit(executor, fn, overrides, job_dir_key, numbers, *rest)
            return [_Settled(self, *job) for job in zip(submitted, overrides, numbers, strict=True)]

        submitit.AutoExecutor.map_array = map_array
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            del submitit.AutoExecutor.map_array  # the inherited one again


class _Settled:
    """A submitted job whose results() is a failed JobReturn, not an exception, where it left no result."""

    def __init__(self, launcher: SlurmLauncher, job, overrides, number: int):
        self.launcher, self.job, self.overrides, self.number = launcher, job, list(overrides), number

    def results(self):
        import submitit

        try:
            return self.job.results()
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as error:
            return [self._failed(error)]

    def _failed(self, error) -> JobReturn:
        import submitit

        if isinstance(error, submitit.core.utils.UncompletedJobError):
            what = f"ended with no result (SLURM state {self.job.state}; killed outside Python: out of memory, "
            what += "SIGKILL or a failed node)"
        else:
            what = "failed outside the run (see its output)"
        job_id = self.job.job_id
        what = f"SLURM job {job_id} {what}"
        return jobs.died(self.launcher, self.overrides, self.number, job_id, what, self.job.paths.stderr)
