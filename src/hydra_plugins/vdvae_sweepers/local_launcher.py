"""Sweep jobs in parallel on this machine (`hydra/launcher=local`): each job in a fresh process of its own,
at most `n_jobs` at a time, the next one starting as soon as one ends.

A job that dies (the out-of-memory killer, SIGKILL, a crash of the interpreter) fails alone: it comes back
as a failed job (`vdvae.errors.JobDied`: crashed in the sweep's summary, with the command that resumes it)
and the others run on. (A pool of workers, as joblib's, stops every job of the sweep when one of its
workers dies.) SIGTERM or Ctrl-C to the sweep stops its running jobs as it stops a run, each saving its
last.ckpt, and the sweep exits 143 or 130 once they have.
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
from pathlib import Path

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

from hydra_plugins.vdvae_sweepers import jobs
from vdvae.config import wanted_value
from vdvae.errors import EXIT_STATUS, Interrupted
from vdvae.lifecycle import StopController

log = logging.getLogger(__name__)


class LocalLauncher(Launcher):
    def __init__(self, n_jobs: int = 2):
        wanted = wanted_value(n_jobs, "int", 1)
        if wanted is not None:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs!r} is not valid: it must be {wanted}")
        self.n_jobs = n_jobs
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config):
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx) -> list[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        at_once = min(self.n_jobs, len(job_overrides))
        # The machine's cores shared among the jobs running at once (torch would give each job all of them).
        threads = max(1, len(os.sched_getaffinity(0)) // max(at_once, 1))
        log.info(
            "Launching %d jobs, %d at a time (%d torch threads each), sweep output dir: %s",
            len(job_overrides),
            self.n_jobs,
            threads,
            sweep_dir,
        )
        batch = [_Job(self, overrides, initial_job_idx + i, threads) for i, overrides in enumerate(job_overrides)]
        for job in batch:
            log.info("\t#%d : %s", job.number, " ".join(filter_overrides(job.overrides)))
        try:
            with StopController():
                self._run(batch)
        except Interrupted as stop:
            running = [job for job in batch if job.process is not None and job.process.is_alive()]
            log.error("%s: stopping %d running jobs, each saves its last.ckpt", stop, len(running))
            for job in running:
                job.process.terminate()  # SIGTERM: the run stops at its next step and saves
            for job in running:
                job.process.join()  # Ctrl-C again: at once
            raise SystemExit(EXIT_STATUS[type(stop)]) from None
        return [job.result for job in batch]

    def _run(self, batch):
        waiting, running = list(batch), []
        while waiting or running:
            while waiting and len(running) < self.n_jobs:
                running.append(waiting.pop(0).start())
            multiprocessing.connection.wait([w for job in running for w in job.waitables()])
            running = [job for job in running if not job.collect()]


class _Job:
    """One sweep job in a process of its own; its JobReturn comes back through a pipe."""

    def __init__(self, launcher: LocalLauncher, overrides, number: int, threads: int):
        self.launcher, self.overrides, self.number, self.threads = launcher, list(overrides), number, threads
        self.process = self.reader = self.result = None

    def start(self) -> "_Job":
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited mid-state
        self.reader, writer = context.Pipe(duplex=False)
        # cloudpickle, as joblib and submitit send a job: the task function is not importable by name.
        job = cloudpickle.dumps((self.launcher, self.overrides, self.number, self.threads, Singleton.get_state()))
        self.process = context.Process(target=_run_job, args=(job, writer), name=f"sweep job {self.number}")
        self.process.start()
        writer.close()  # the job holds the only writer: its end reads as EOF here
        return self

    def waitables(self) -> list:
        return [self.process.sentinel] + ([self.reader] if self.reader is not None else [])

    def collect(self) -> bool:
        """Read what the job sent; whether it has ended."""
        if self.reader is not None and self.reader.poll():
            try:
                self.result = self.reader.recv()
            except EOFError:
                pass
            self.reader.close()
            self.reader = None
        if self.process.is_alive():
            return False
        self.process.join()
        if self.result is None:
            code = self.process.exitcode
            if code < 0:
                how = f"killed by {signal.Signals(-code).name}, outside Python: out of memory, kill -9 or a crash"
            elif code - 128 in (signal.SIGTERM, signal.SIGINT):
                how = f"stopped by {signal.Signals(code - 128).name}, exit status {code}"
            else:
                how = f"exit status {code}"
            what = f"job {self.number} ended with no result ({how})"
            job_id = _job_id(self.launcher, self.number)
            self.result = jobs.died(self.launcher, self.overrides, self.number, job_id, what)
        return True


def _job_id(launcher, number: int) -> str:
    return f"{launcher.config.hydra.job.name}_{number}"


def _run_job(job: bytes, writer):
    """In the job's process: run it as Hydra runs a sweep job, and send back its JobReturn."""
    launcher, overrides, number, threads, singleton_state = cloudpickle.loads(job)
    if "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
        import torch

        torch.set_num_threads(threads)
    setup_globals()
    Singleton.set_state(singleton_state)
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config):
        config.hydra.job.id, config.hydra.job.num = _job_id(launcher, number), number
    HydraConfig.instance().set_config(config)
    result = run_job(
        hydra_context=launcher.hydra_context,
        task_function=launcher.task_function,
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    # Plain values: the config's dataclass nodes (Hydra's sweeper's) are classes of this process's plugin scan.
    result.hydra_cfg = OmegaConf.create(OmegaConf.to_container(result.hydra_cfg))
    try:
        writer.send(result)  # pickled whole before anything is written
    except (pickle.PicklingError, TypeError, AttributeError):  # an error that cannot be pickled: its words
        error = result._return_value
        result._return_value = RuntimeError(f"{type(error).__name__}: {error}")
        writer.send(result)
