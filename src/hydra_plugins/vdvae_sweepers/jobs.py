"""What this package's launchers share: the run directory of a sweep job, and a job that died without a
result (killed outside Python) as a failed job of the sweep, which the sweepers record as crashed."""

from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from vdvae.errors import JobDied
from vdvae.sweeps import resume_hint


def run_dir(launcher, overrides, number: int, job_id: str) -> Path:
    """The run directory of sweep job `number`, as the job itself names it (hydra.sweep.subdir)."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config.hydra.job):
        config.hydra.job.num, config.hydra.job.id = number, job_id
    return Path(str(launcher.config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def died(launcher, overrides, number: int, job_id: str, what: str, output=None) -> JobReturn:
    """A failed JobReturn for a job that left no result: `what` happened, how to resume it, its output."""
    folder = run_dir(launcher, overrides, number, job_id)
    message = f"{what}; {resume_hint(folder, overrides)}" + (f"; its output: {output}" if output else "")
    return JobReturn(
        overrides=list(overrides),
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(folder)}}}),
        status=JobStatus.FAILED,
        _return_value=JobDied(message),
    )
