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
import re
import shutil
import signal
import sys
import traceback
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vdvae import run_folder, sweeps
from vdvae.config import (
    check_config,
    check_mode,
    check_optimized_metric,
    check_trainer,
    is_worker_process,
    wanted_value,
)
from vdvae.errors import EXIT_STATUS, ConfigError, Interrupted, JobEnded, Terminated, TrainingStalled, refuse

log = logging.getLogger(__name__)

# What is a refusal (bad input, explained in one line), not a crash (a traceback).
REFUSALS = (ValueError, OSError, TrainingStalled)


def command(task, cfg: DictConfig, interruptible: bool = True):
    """Run `task(cfg)` as a command: where `interruptible`, signals stop it at once; training, which is not,
    stops at a step boundary in fit and test and elsewhere ends as the signal's default does. Its refusals
    end it in one line, an empty run folder it created is removed, and its W&B run is finished. Returns
    what the task returns (a sweep's objective)."""
    try:
        if _refusal is not None:  # a sweep job whose folder is another's
            raise _refusal
        # Training's own controller (around fit and test) hands SLURM's USR2 to submitit's requeue.
        with StopController(at_step=not interruptible, requeue=False):
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


class _NothingToActOn(logging.Filter):
    """Lightning's messages that say nothing a user can act on (an advertisement; that our model summary
    replaces its own), or that ours say better (its "Received SIGTERM" is also said after a Ctrl-C)."""

    LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.signal_connector")
    NOISE = ("💡 Tip:", "Trainer already configured with model summary callbacks", "Received SIGTERM")

    def filter(self, record):
        return not any(noise in str(record.msg) for noise in self.NOISE)


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
    for name in _NothingToActOn.LOGGERS:
        library = logging.getLogger(name)
        if not any(isinstance(f, _NothingToActOn) for f in library.filters):
            library.addFilter(_NothingToActOn())
    # ResumableSampler continues an epoch where the checkpoint left it (tests/test_reliability.py), which
    # Lightning cannot see: its warning that a mid-epoch resume is unreliable does not apply.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # A machine with SLURM's client installed runs local jobs too; SLURM jobs are started by srun (vdvae.slurm).
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    # Lightning 2.6's own use of torch's pytree API, deprecated by torch 2.14: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # optuna 2.10's storage on SQLAlchemy 1.4 (the optuna extra pins both): nothing a user can act on either.
    warnings.filterwarnings("ignore", message="Deprecated API features detected")


# The run directory this process's job created (set by RunDirGuard as the job starts), or None: one that
# existed before (an empty folder of the user's, a run being resumed or requeued) is never removed.
_created_run_dir: Path | None = None
# The run directory whose config (and the checkpoint it names) RunDirGuard checked before the run started.
_checked_run_dir: Path | None = None
# Why this sweep job may not write into its folder (another job's), found as it started, or None.
_refusal: ConfigError | None = None


def checked_before_start() -> bool:
    """Whether this run's config, and the checkpoint it names, were checked before the run started (single
    runs, by RunDirGuard): the recipe need not check them again. A sweep's jobs, and recipes run in-process,
    check their own."""
    folder = run_folder.current()
    return folder is not None and run_folder.normalised(folder) == _checked_run_dir


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
    (its config and log), its identity, and empty folders (a logger's): nothing of a user's, an earlier
    run's or a resumed run's is ever removed."""
    out = run_folder.current()
    if out is None:  # not under Hydra
        return
    out, ours = run_folder.normalised(out), {run_folder.log_file().name, run_folder.IDENTITY}
    if out != _created_run_dir or not out.is_dir() or out.is_symlink():
        return
    for folder, subfolders, files in os.walk(out):
        where = Path(folder).relative_to(out)
        if where.parts[:1] == (".hydra",):
            continue
        links = [d for d in subfolders if (Path(folder) / d).is_symlink()]
        if links or (files and (where != Path(".") or not set(files) <= ours)):
            return  # something this run made that may be worth keeping
    shutil.rmtree(out)


def check_request(cfg: DictConfig):
    """eval.py, sample.py, compress.py: the mode, and the checkpoint the request names (readable, a vdvae
    checkpoint, and its data config plain data where it will be used), before any work."""
    check_mode(cfg)
    check_trainer(cfg.get("trainer") or {})
    from vdvae.checkpoints import check_checkpoint  # here: reading checkpoints imports torch

    check_checkpoint(cfg.ckpt_path, stored_data=cfg.get("data") is None)


def check_study(sweeper):
    """An Optuna study's options: at least one trial, a plain name (its database file is named by it), and a
    SQLite storage that is no other program's database (Optuna would add its tables to it)."""
    if "n_trials" in sweeper and wanted_value(sweeper.n_trials, "int", 1):
        raise ConfigError(f"hydra.sweeper.n_trials={sweeper.n_trials!r} is not valid: it must be an integer >= 1")
    name = sweeper.get("study_name")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", str(name)):
        raise ConfigError(
            f"hydra.sweeper.study_name={str(name)[:100]!r} is not a plain name: letters, digits, '_', '-' and '.', "
            f"at most 100, starting with a letter or digit (it names the study's file)"
        )
    storage = sweeper.get("storage")
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        _check_sqlite(Path(storage[len("sqlite:///") :]))


def _check_sqlite(path: Path):
    import sqlite3

    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as error:
        raise ConfigError(f"hydra.sweeper.storage names {path}, which is not a SQLite database ({error})") from None
    if tables and "studies" not in tables:
        raise ConfigError(
            f"hydra.sweeper.storage names {path}, the SQLite database of another program (tables: "
            f"{', '.join(sorted(tables)[:5])}): name a file of its own for the study"
        )


# The most jobs a grid may hold: Hydra lists every job before the first starts (10 million: minutes, GB).
MAX_JOBS = 10_000


def check_grid_size(overrides):
    """A grid's jobs (the product of its swept values) must be at most MAX_JOBS."""
    import math

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    jobs = 1
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        value = override.value() if override.is_sweep_override() else None
        if isinstance(value, ChoiceSweep):
            jobs *= len(value.list)
        elif isinstance(value, RangeSweep) and value.step:
            jobs *= max(0, math.ceil((value.stop - value.start) / value.step))
    if jobs > MAX_JOBS:
        raise ConfigError(f"the sweep has {jobs:,} jobs, more than {MAX_JOBS:,}: split it into smaller sweeps")


def check_writable(folder: Path, option: str):
    """`folder`, or the nearest folder above it that exists, must be writable: Hydra writes there first."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={folder} cannot be written ({existing} is read-only to this user): name another")


# What a sweep's subfolder must name to give each job a folder of its own.
_JOB_NAMES = ("hydra.job.num", "hydra.job.id", "hydra.job.override_dirname")


class RunDirGuard(Callback):
    """A run's folder is its own, by identity (`vdvae.run_folder`): a run writes only into a new (or empty)
    folder, which it claims with an identity of its own, or into its own folder again: resuming it
    (`ckpt_path=<run>/checkpoints/...`) or requeued (the same SLURM job, the same job of the same sweep).
    Anything else is refused in one line before Hydra writes anything; a sweep must start in a new folder,
    and give each job a folder of its own. Paths are compared as Hydra writes them (`run_folder.normalised`).
    Only a folder this run created is ever removed (`remove_empty_run_dir`)."""

    def __init__(self):
        # A single run's identity, or the sweep's (its jobs are `<sweep>/<job number>`); the guard travels
        # to the jobs' processes with Hydra's callbacks, so that a requeued job finds its own again.
        self.identity: str | None = None
        self.sweep = False
        self.run_dir_existed = False

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _checked_run_dir, _created_run_dir
        run_dir = run_folder.normalised(config.hydra.run.dir)
        self.run_dir_existed = run_dir.exists()
        # Hydra turns a callback's exception into a warning and goes on: stop the run with its message instead.
        try:  # the folder first: a cheap check, before the config's imports torch
            self.identity = None if is_worker_process() else self._identity_in(run_dir, config)
            self.check(config)
        except Exception as error:
            refuse(error)
        except KeyboardInterrupt:  # Ctrl-C while the checks import torch: nothing was written
            print(f"stopped by Ctrl-C before the run started; exit status {EXIT_STATUS[Interrupted]}", file=sys.stderr)
            raise SystemExit(EXIT_STATUS[Interrupted]) from None
        _checked_run_dir = run_dir
        if not is_worker_process():
            # From here until the command's own handlers (Hydra makes the folder and writes its config): a stop
            # removes the folder Hydra made for this run, if that is all there is, and ends in one line.
            _created_run_dir = None if self.run_dir_existed else run_dir
            StopController(at_step=True, requeue=False).__enter__()  # never left: the process ends first

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if is_worker_process():
            return
        self.sweep, self.identity = True, run_folder.new_identity()
        sweep_dir = run_folder.normalised(config.hydra.sweep.dir)
        try:
            if config.get("model") is not None:  # a training sweep: what it optimizes, before its first job
                check_optimized_metric(config)
            check_study(config.hydra.get("sweeper") or {})
            if "n_trials" not in (config.hydra.get("sweeper") or {}):  # a grid (Optuna asks its trials one by one)
                check_grid_size(config.hydra.overrides.task)
            check_writable(sweep_dir, "hydra.sweep.dir")
            subdir = str(OmegaConf.to_container(config.hydra.sweep).get("subdir"))
            if not any(name in subdir for name in _JOB_NAMES):
                raise ConfigError(
                    f"hydra.sweep.subdir={subdir} gives every job of the sweep the same folder: each job needs "
                    f"its own; leave it unset (${{hydra.job.num}}) or name {' or '.join(_JOB_NAMES)} in it"
                )
            # The same sweep again (its driver requeued by SLURM) finds its own identity there.
            if not run_folder.is_empty(sweep_dir) and run_folder.identity_of(sweep_dir) != self.identity:
                raise ConfigError(
                    f"hydra.sweep.dir={sweep_dir} already exists: a sweep writes only into a new folder; name a "
                    f"new one or leave hydra.sweep.dir unset (each job's last.ckpt resumes that job alone)"
                )
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if not run_folder.claim(sweep_dir, self.identity):
                raise ConfigError(f"hydra.sweep.dir={sweep_dir} was just taken by another sweep: name a new one")
        except (ConfigError, OSError) as error:
            refuse(error)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        global _created_run_dir, _refusal
        _created_run_dir = _refusal = None
        if is_worker_process():
            return
        out = run_folder.normalised(config.hydra.runtime.output_dir)
        if self.sweep:
            identity, fresh = f"{self.identity}/{config.hydra.job.num}", run_folder.identity_of(out) is None
        else:
            identity, fresh = self.identity or run_folder.new_identity(), not self.run_dir_existed
        if not run_folder.claim(out, identity):
            _refusal = ConfigError(
                f"{out} is another run's folder (a job of this sweep, or a run started at the same time): "
                f"this job writes nothing there"
            )
            return
        run_folder.own(out, identity)
        _created_run_dir = out if fresh else None

    def check(self, config: DictConfig):
        is_training = config.get("model") is not None
        if is_training:
            check_config(config)
            checkpoint = None
            if config.get("ckpt_path"):  # the file first: a wrong one is refused before Lightning is imported
                from vdvae.checkpoints import load_checkpoint

                checkpoint = load_checkpoint(config.ckpt_path)
            from vdvae.resume import check_resume_on_meta

            check_resume_on_meta(config, checkpoint)
        elif config.get("task_name") in ("eval", "sample", "compress"):
            check_request(config)

    @staticmethod
    def _identity_in(run_dir: Path, config: DictConfig) -> str:
        """This run's identity, where `run_dir` may be its folder: a new one for a new (or empty) folder,
        the folder's own where this run resumes it or is its requeued self; else the run is refused."""
        check_writable(run_dir, "hydra.run.dir")
        identity, written = run_folder.new_identity(), run_folder.identity_of(run_dir)
        if run_folder.is_empty(run_dir) or (
            run_folder.launcher_job_name() and run_folder.holds_only_further_ranks_logs(run_dir)
        ):
            return identity  # (a launched job's further ranks may have started first)
        if written == identity:  # its requeued self, which resumes its own last.ckpt only
            if config.get("model") is not None and not config.get("ckpt_path"):
                from vdvae.resume import check_last_is_own

                check_last_is_own(run_dir, identity)
            return identity
        resumed = config.get("model") is not None and run_folder.run_of_checkpoint(config.get("ckpt_path")) == run_dir
        if resumed:
            return written or identity  # a run made before runs had identities takes one now
        earlier = f"hydra.run.dir={run_dir} holds an earlier run: a new run never writes into it"
        if run_folder.holds_a_run(run_dir) and config.get("model") is not None:
            raise ConfigError(
                f"{earlier}. Resume that run with ckpt_path={run_folder.last_checkpoint(run_dir)}, or leave "
                f"hydra.run.dir unset for a new directory"
            )
        if run_folder.holds_a_run(run_dir):
            raise ConfigError(f"{earlier}. Leave hydra.run.dir unset for a new directory")
        raise ConfigError(
            f"hydra.run.dir={run_dir} already exists and holds files that are not this run's: a run writes only "
            f"into a new or empty folder; name a new one, or leave hydra.run.dir unset for a new directory"
        )


class StopController:
    """Owns SIGINT, SIGTERM and SIGUSR2 while installed (`with`), and restores the handlers there before.

    At once (the default): SIGTERM raises `Terminated`, SIGINT `Interrupted`, wherever the command is.
    `at_step` (training): while Lightning runs a loop (from its sanity check, training, validation or test
    start to its teardown; `callback()`, which training adds to its trainer, says when), a SIGTERM stops at
    the next step boundary, where last.ckpt is saved, and a first Ctrl-C is turned into such a SIGTERM (a
    second one stops at once), so that no stop saves a half-done update. Under SLURM with submitit's USR2
    handler (its time limit, pre-emption), USR2 is such a stop too, after which `stopped()` hands the job to
    submitit's handler, which requeues it. Outside Lightning's loops, `at_step` ends the process as the
    signal's default does (an exception raised from a handler can be lost, where the signal lands in a
    finalizer), after removing an empty run folder this run made. `requeue=False`: SIGUSR2 is left to the
    handler there (an inner controller's)."""

    def __init__(self, at_step: bool = False, requeue: bool = True):
        self.at_step, self.requeue, self.caught, self.previous = at_step, requeue, None, {}
        self._trainer = None  # the trainer running a loop, which stops at its next step boundary
        self._pending = False  # told to stop, not yet agreed with the other processes (`agree`)

    def callback(self):
        """The Lightning callback that tells this controller when Lightning runs a loop."""
        from vdvae.callbacks import LoopsListen

        return LoopsListen(self)

    def listen(self, trainer):
        """From the trainer's setup and each loop's start to Lightning's teardown, SIGTERM is this
        controller's, not Lightning's: Lightning 2.6's handler broadcasts from rank 0 inside the signal
        handler, which deadlocks a rank that the signal meets inside a collective (the gradients'
        all-reduce): a `scontrol requeue` of a DDP job hung until SLURM killed it, unsaved. This one raises
        Lightning's flag; in training with several processes, only once every process has agreed to stop
        (`agree`, at the end of each step), so that all of them stop at the same step boundary."""
        self._trainer = trainer
        if trainer is not None:
            signal.signal(signal.SIGTERM, self._on_sigterm)
            if self._pending and trainer.state.fn != "fit":  # told during training's last step: stop the test
                trainer._signal_connector.received_sigterm = True

    def agree(self, trainer):
        """At the end of a training step of several processes: whether any of them was told to stop (one
        all-reduce); if so, every one raises Lightning's flag, and all stop at this step's boundary."""
        if trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            trainer._signal_connector.received_sigterm = True

    def __enter__(self):
        handlers = {signal.SIGINT: self._on_sigint, signal.SIGTERM: self._on_sigterm}
        usr2 = signal.getsignal(signal.SIGUSR2)
        if self.at_step and self.requeue and callable(usr2) and os.environ.get("SLURM_JOB_ID"):
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
        return self.at_step and self._trainer is not None

    def _on_sigterm(self, signum, frame):
        if not self.at_step:
            raise Terminated()
        if not self._lightning_listens():
            self._end_as_the_signal_does(signum)
        if not self.caught:  # (after Ctrl-C or USR2, this SIGTERM is their stop, already said)
            log.warning("SIGTERM: stopping after this step, saving last.ckpt")
        self.caught = self.caught or signal.SIGTERM
        trainer = self._trainer
        if trainer.world_size > 1 and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._pending = True  # stops where all processes agree (`agree`)
        else:
            trainer._signal_connector.received_sigterm = True  # Lightning stops at the step (or test batch) boundary

    def _on_sigint(self, signum, frame):
        if self.at_step and not self.caught and not self._lightning_listens():
            self._end_as_the_signal_does(signum)
        if self.caught or not self._lightning_listens():
            raise Interrupted()  # not KeyboardInterrupt, which Lightning turns into exit status 1
        self.caught = signal.SIGINT
        log.warning("Ctrl-C: stopping after this step, saving last.ckpt (Ctrl-C again: stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)

    @staticmethod
    def _end_as_the_signal_does(signum):
        """Outside Lightning's fit and test (starting, or between them): an empty run folder this run made is
        removed and the process ends as the signal's default does (exit 143 or 130), with one line. (An
        exception raised here could be lost, where the signal lands in a finalizer.)"""
        remove_empty_run_dir()
        log.error("stopped by %s; exit status %d", "Ctrl-C" if signum == signal.SIGINT else "SIGTERM", 128 + signum)
        logging.shutdown()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

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
    from vdvae.slurm import on_the_cluster, slurm_requeues_this_job
    from vdvae.sweeps import resume_hint

    requeued, state = slurm_requeues_this_job()
    if requeued is False:
        several = int(os.environ.get("SLURM_JOB_NUM_NODES") or 1) > 1 and HydraConfig.initialized()
        cluster = on_the_cluster(HydraConfig.get().overrides.hydra) if several else []  # (resumes on nodes alike)
        raise JobEnded(
            f"SLURM stopped job {os.environ['SLURM_JOB_ID']} without requeueing it ({state}: scancel, or its "
            f"time limit); {resume_hint(run_folder.current(), run_folder.overrides(), cluster)}"
        )
