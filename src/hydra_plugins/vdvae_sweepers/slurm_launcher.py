"""Hydra's submitit SLURM launcher, whose jobs fail alone.

Hydra's launcher collects its jobs' results one after another and raises at the first job that left
none: a job killed outside Python (the out-of-memory killer, SIGKILL, a failed node) loses the results
of the whole batch, and the sweep ends with a traceback and no summary. Here such a job comes back as a
failed job (`vdvae.slurm.JobDied`: status crashed in the sweep's summary) that names its SLURM state,
its output and the checkpoint that resumes it; every other job comes back as it ended.
"""

from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf, open_dict

from vdvae.slurm import JobDied, resume_hint


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        import submitit  # here, as Hydra's launcher does: every command imports this module

        # Hydra's launch submits with executor.map_array and then calls results() on each job it
        # returned; for that one call, the jobs it gets are ones whose results() do not raise.
        submit = submitit.AutoExecutor.map_array

        def map_array(executor, fn, overrides, job_dir_key, numbers, *rest):
            jobs = submit(executor, fn, overrides, job_dir_key, numbers, *rest)
            return [_Settled(self, *job) for job in zip(jobs, overrides, numbers, strict=True)]

        submitit.AutoExecutor.map_array = map_array
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            del submitit.AutoExecutor.map_array  # the inherited one again

    def run_dir(self, overrides, number: int, job_id: str) -> Path:
        """The run directory of sweep job `number`, as the job itself names it (hydra.sweep.subdir)."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.num, config.hydra.job.id = number, job_id
        return Path(str(self.config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


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

        run_dir = self.launcher.run_dir(self.overrides, self.number, self.job.job_id)
        if isinstance(error, submitit.core.utils.UncompletedJobError):
            why = f"ended with no result (SLURM state {self.job.state}; killed outside Python: out of memory, SIGKILL"
            why += " or a failed node)"
        else:
            why = "failed outside the run (see its output)"
        hint, output = resume_hint(run_dir, self.overrides), self.job.paths.stderr
        died = JobDied(f"SLURM job {self.job.job_id} {why}; {hint}; its output: {output}")
        return JobReturn(
            overrides=self.overrides,
            hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}}),
            status=JobStatus.FAILED,
            _return_value=died,
        )
