"""The run lifecycle: what happens around every command, in one place.

- How a command ends (`command`, the wrapper of every task): a refusal (a ValueError or OSError: bad
  input, a damaged file, a folder it cannot write; or a stalled run) ends it with one line, `Error: ...`,
  exit status 1 (HYDRA_FULL_ERROR=1: the traceback); SIGTERM and Ctrl-C with 143 and 130 (the statuses:
  vdvae.errors.EXIT_STATUS). A training sweep's job that fails does so alone: its record says how
  (vdvae.sweeps) and it returns, so that the sweep goes on. A run folder this run created and left empty
  is removed, and the job's W&B run is finished.
- Which folder is this run's (`RunDirGuard`, a Hydra callback): a run never writes into an earlier run's
  folder except to resume it, and only a folder this run created is ever removed.
- Signals (`StopController`): SIGINT, SIGTERM and SIGUSR2 stop the command at once, or in training at the
  next step boundary (Lightning's own SIGTERM path, which saves last.ckpt), or hand the job to SLURM's
  requeue; the handlers there before are restored afterwards.
"""

import contextlib
import logging
import os
import shutil
import signal
import sys
import traceback
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from vdvae import run_folder, sweeps
from vdvae.config import check_config, check_mode, check_optimized_metric, check_trainer, is_worker_process
from vdvae.errors import EXIT_STATUS, ConfigError, Interrupted, JobEnded, Terminated, TrainingStalled, refuse

log = logging.getLogger(__name__)

# What is a refusal (bad input, explained in one line), not a crash (a traceback).
REFUSALS = (ValueError, OSError, TrainingStalled)


def command(task, cfg: DictConfig, interruptible: bool = True):
    """Run `task(cfg)` as a command: where `interruptible`, signals stop it at once (training, which is not,
    stops at a step boundary itself), its refusals end it in one line, an empty run folder it created is
    removed, and its W&B run is finished. Returns what the task returns (a sweep's objective)."""
    try:
        with StopController() if interruptible else contextlib.nullcontext():
            return task(cfg)
    except Interrupted as stop:
        remove_empty_run_dir()
        log.error("%s", stop.line or f"{stop}; no result written")
        raise SystemExit(EXIT_STATUS[type(stop)]) from None
    except Exception as error:
        if sweeps.recording():  # a training sweep's job fails alone: its record says how, the sweep goes on
            sweeps.report(error=error)
            _traceback_kept_in_log(error)
            return None
        if not isinstance(error, REFUSALS):
            raise  # a crash: its traceback
        remove_empty_run_dir()
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_a_sweep():
            raise  # in other sweeps, Hydra records the failure
        refuse(error, _traceback_kept_in_log(error))
    finally:
        finish_wandb()


def _in_a_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _traceback_kept_in_log(error: BaseException) -> str:
    """Append the traceback to the run's log file where the run directory is kept (a failure after work
    started: worth reading), and say where; "" where there is none."""
    path = run_folder.log_file()
    if path is None or not path.is_file():
        return ""
    with open(path, "a") as file:
        file.write("".join(traceback.format_exception(error)))
    return f" (traceback in {path})"


def finish_wandb():
    """End the W&B run of this job, if a logger started one: one W&B run per job, also in multirun sweeps.
    Without a W&B logger wandb is never imported (runs with logger=csv need no wandb installed)."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


def route_library_logs():
    """Lightning's messages and Python warnings go through Hydra's handlers, into the console and the run's
    log file once each: Lightning gives its loggers their own console handler when imported before Hydra
    configures logging, and stops them from reaching the root logger."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
    logging.captureWarnings(True)
    # ResumableSampler continues an epoch where the checkpoint left it (tests/test_reliability.py), which
    # Lightning cannot see: its warning that a mid-epoch resume is unreliable does not apply.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # A machine with SLURM's client installed runs local jobs too; SLURM jobs are started by srun (vdvae.slurm).
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    # Lightning 2.6's own use of torch's pytree API, deprecated by torch 2.14: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


# The run directory this process's job created (set by RunDirGuard as the job starts), or None: one that
# existed before (a folder of the user's, a run being resumed or requeued) is never removed.
_created_run_dir: Path | None = None
# The run directory whose config (and the checkpoint it names) RunDirGuard checked before the run started.
_checked_run_dir: Path | None = None


def checked_before_start() -> bool:
    """Whether this run's config, and the checkpoint it names, were checked before the run started (single
    runs, by RunDirGuard): the recipe need not check them again. A sweep's jobs, and recipes run in-process,
    check their own."""
    folder = run_folder.current()
    return folder is not None and folder.absolute() == _checked_run_dir


@contextlib.contextmanager
def no_run_dir_on_failure():
    """A failure in the block (bad input, checked before any work) deletes what Hydra wrote for this run,
    if that is all there is and this run created the directory, and re-raises."""
    try:
        yield
    except Exception:
        remove_empty_run_dir()
        raise


def remove_empty_run_dir():
    """Delete this run's directory if this run created it and it holds nothing but what Hydra wrote for it
    (its config and log) and empty folders (a logger's): nothing of a user's, an earlier run's or a resumed
    run's is ever removed."""
    out = run_folder.current()
    if out is None:  # not under Hydra
        return
    out, log_file = out.absolute(), run_folder.log_file().name
    if out != _created_run_dir or not out.is_dir() or out.is_symlink():
        return
    for folder, subfolders, files in os.walk(out):
        where = Path(folder).relative_to(out)
        if where.parts[:1] == (".hydra",):
            continue
        links = [d for d in subfolders if (Path(folder) / d).is_symlink()]
        if links or (files and (where != Path(".") or files != [log_file])):
            return  # something this run made that may be worth keeping
    shutil.rmtree(out)


def _entries(directory) -> set[str] | None:
    """The names in `directory`, or None if it does not exist."""
    path = Path(str(directory)).expanduser().absolute()
    return {p.name for p in path.iterdir()} if path.is_dir() else None


def check_request(cfg: DictConfig):
    """eval.py, sample.py, compress.py: the mode, and the checkpoint the request names (readable, a vdvae
    checkpoint, and its data config plain data where it will be used), before any work."""
    check_mode(cfg)
    check_trainer(cfg.get("trainer") or {})
    from vdvae.checkpoints import check_checkpoint  # here: reading checkpoints imports torch

    check_checkpoint(cfg.ckpt_path, stored_data=cfg.get("data") is None)


class RunDirGuard(Callback):
    """Refuses, before Hydra creates or writes anything, a run directory that holds another run; and notes
    which directories Hydra is about to create, so that only those are ever removed (`remove_empty_run_dir`).

    A run may write into an existing run's directory only to resume it (`ckpt_path=<run>/checkpoints/...`).
    """

    def __init__(self):
        # What existed before Hydra made anything: the run directory (single runs), or the sweep directory
        # and its entries (multirun; the guard travels to the jobs' processes with Hydra's callbacks).
        self.existed: dict[str, set[str] | None] = {}

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _checked_run_dir
        self.existed = {"run": _entries(config.hydra.run.dir)}
        # Hydra turns a callback's exception into a warning and goes on: stop the run with its message instead.
        try:
            self.check(config)
        except Exception as error:
            refuse(error)
        _checked_run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.existed = {"sweep": _entries(config.hydra.sweep.dir)}
        if config.get("model") is not None:  # a training sweep: what it optimizes, before its first job
            try:
                check_optimized_metric(config)
            except ConfigError as error:
                refuse(error)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        global _created_run_dir
        out = Path(str(config.hydra.runtime.output_dir)).absolute()
        if "run" in self.existed:
            created = self.existed["run"] is None
        else:  # a sweep's job: its directory is new if the sweep's was, or if the sweep's lacked it
            sweep = Path(str(config.hydra.sweep.dir)).absolute()
            before = self.existed.get("sweep")
            created = out.parent == sweep and (before is None or out.name not in before)
        _created_run_dir = out if created and not is_worker_process() else None

    def check(self, config: DictConfig):
        is_training = config.get("model") is not None
        if is_training:
            check_config(config)
            if config.get("ckpt_path"):  # the file first: a wrong one is refused before Lightning is imported
                from vdvae.checkpoints import load_checkpoint

                checkpoint = load_checkpoint(config.ckpt_path)
                from vdvae.resume import check_resume_on_meta

                check_resume_on_meta(config, checkpoint)
        elif config.get("task_name") in ("eval", "sample", "compress"):
            check_request(config)
        run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
        if not run_folder.holds_a_run(run_dir) or is_worker_process():
            return
        if is_training and run_folder.run_of_checkpoint(config.get("ckpt_path")) == run_dir:
            return
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds an earlier run: a new run never writes into it. Resume that run with "
            f"ckpt_path={run_folder.last_checkpoint(run_dir)}, or leave hydra.run.dir unset for a new directory"
        )


class StopController:
    """Owns SIGINT, SIGTERM and SIGUSR2 while installed (`with`), and restores the handlers there before.

    At once (the default): SIGTERM raises `Terminated`, SIGINT `Interrupted`, wherever the command is.
    `at_step` (training): while Lightning's SIGTERM handler is installed (during fit and test; it calls the
    handler that was there before, this one), a SIGTERM stops at the next step boundary, where last.ckpt is
    saved, and a first Ctrl-C is turned into such a SIGTERM (a second one stops at once), so that no stop
    saves a half-done update. Under SLURM with submitit's USR2 handler (its time limit, pre-emption), USR2
    is such a stop too, after which `stopped()` hands the job to submitit's handler, which requeues it.
    Outside Lightning's fit and test, `at_step` ends the process as SIGTERM's default does (an exception
    raised from a handler can be lost, where the signal lands in a finalizer) and Ctrl-C stops at once."""

    def __init__(self, at_step: bool = False):
        self.at_step, self.caught, self.previous = at_step, None, {}

    def __enter__(self):
        handlers = {signal.SIGINT: self._on_sigint, signal.SIGTERM: self._on_sigterm}
        usr2 = signal.getsignal(signal.SIGUSR2)
        if self.at_step and callable(usr2) and os.environ.get("SLURM_JOB_ID"):
            handlers[signal.SIGUSR2] = self._on_usr2
            log.info(
                "SLURM job %s, SLURM_RESTART_COUNT=%s: SIGUSR2 saves last.ckpt and requeues the job",
                os.environ["SLURM_JOB_ID"],
                os.environ.get("SLURM_RESTART_COUNT", "0"),
            )
        self.previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _lightning_listens(self) -> bool:
        return self.at_step and signal.getsignal(signal.SIGTERM) != self._on_sigterm

    def _on_sigterm(self, signum, frame):
        if not self.at_step:
            raise Terminated()
        if not self._lightning_listens():  # between fit, validation and test: the signal's own end (exit 143)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.caught = self.caught or signal.SIGTERM  # Lightning stops at the step boundary

    def _on_sigint(self, signum, frame):
        if self.caught or not self._lightning_listens():
            raise Interrupted()  # not KeyboardInterrupt, which Lightning turns into exit status 1
        self.caught = signal.SIGINT
        log.warning("Ctrl-C: stopping after this step, saving last.ckpt (Ctrl-C again: stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_usr2(self, signum, frame):
        log.warning("SIGUSR2: stopping at the next step to save, then requeueing")
        self.caught = signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own stop: at a step boundary, on every rank

    def stopped(self) -> Interrupted:
        """After Lightning's stop at a step boundary (last.ckpt saved): the stop to raise (exit 130 after
        Ctrl-C, else 143). After SLURM's USR2 the job is first handed to submitit's handler (requeue it,
        exit); after a SIGTERM under SLURM that does not requeue the job, `JobEnded` is raised instead."""
        if self.caught == signal.SIGUSR2:
            handler = self.previous[signal.SIGUSR2]
            signal.signal(signal.SIGUSR2, handler)
            handler(signal.SIGUSR2, None)
        elif os.environ.get("SLURM_JOB_ID") and signal.SIGUSR2 in self.previous:
            _raise_unless_requeued()
        if self.caught == signal.SIGINT:
            return Interrupted(line=f"stopped by Ctrl-C; exit status {EXIT_STATUS[Interrupted]}")
        return Terminated(line=f"stopped by SIGTERM; exit status {EXIT_STATUS[Terminated]}")


def _raise_unless_requeued():
    """After SLURM's SIGTERM: return where SLURM requeues the job (or cannot say), else raise `JobEnded`."""
    from vdvae.slurm import slurm_requeues_this_job
    from vdvae.sweeps import resume_hint

    requeued, state = slurm_requeues_this_job()
    if requeued is False:
        raise JobEnded(
            f"SLURM stopped job {os.environ['SLURM_JOB_ID']} without requeueing it ({state}: scancel, or its "
            f"time limit); {resume_hint(run_folder.current(), run_folder.overrides())}"
        )
