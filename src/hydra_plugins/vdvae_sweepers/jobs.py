"""What this package's launchers share: the run directory of a sweep job, and a job that died without a
result (killed outside Python), which only its launcher sees: its record says so (vdvae.sweeps), and it
comes back to the sweeper as a job without a value, so that the sweep goes on."""

from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from vdvae import sweeps
from vdvae.errors import JobDied


def run_dir(launcher, overrides, number: int, job_id: str) -> Path:
    """The run directory of sweep job `number`, as the job itself names it (hydra.sweep.subdir)."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config.hydra.job):
        config.hydra.job.num, config.hydra.job.id = number, job_id
    return Path(str(launcher.config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def died(launcher, overrides, number: int, job_id: str, what: str, output=None, cluster=()) -> JobReturn:
    """Record that job `number` left no result (`what` happened; how to resume it, with the overrides of
    the `cluster` it must run on; its output), and its JobReturn: completed, without a value."""
    folder = run_dir(launcher, overrides, number, job_id)
    message = f"{what}; {sweeps.resume_hint(folder, overrides, cluster)}"
    message += f"; its output: {output}" if output else ""
    sweeps.write_record(folder, sweeps.make_record(folder.name, overrides, JobDied(message), num=number))
    return JobReturn(
        overrides=list(overrides),
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(folder)}}}),
        status=JobStatus.COMPLETED,
        _return_value=None,
    )
