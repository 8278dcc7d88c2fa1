"""The Optuna sweeper (`hparams_search=optuna`): hydra-optuna-sweeper's search space and options, with a
study loop of its own. A failed trial is told to the study as FAIL and the study goes on to `n_trials`;
with a storage (on by default in conf/hparams_search/optuna.yaml) the same command continues a stopped
study, keeping its finished trials and asking its interrupted ones again. Each job's record
(vdvae.sweeps) gets its trial's number, and the sweep's summary the study's best trial and the
parameters' importances.

The loop is a backport: hydra-optuna-sweeper 1.2.0 (the release that works with hydra-core 1.3) ends the
whole study at a trial without a finite objective (Hydra issue 2237), and 1.3.0's `max_failure_rate` still
fails there (`study.tell` is given values with state FAIL). It can go when a release tells such a trial as
FAIL and goes on; until then it uses the plugin's private `_impl` helpers (search space, trial overrides),
held by the pin in pyproject.toml.
"""

import contextlib
import functools
import logging
import math
import os
import socket
import threading
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from vdvae import run_folder, sweeps
from vdvae.errors import one_line, refuse

try:  # the optuna extra (pip install -e '.[optuna]'); Hydra imports this module for every command
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as HydraOptunaSweeper
except ImportError:
    HydraOptunaSweeper = None

log = logging.getLogger(__name__)


def _job_dir(job: JobReturn) -> Path | None:
    output_dir = OmegaConf.select(job.hydra_cfg, "hydra.runtime.output_dir") if job.hydra_cfg else None
    return Path(output_dir) if output_dir else None


def _note_trial(job: JobReturn, trial: int, value):
    """The job's record gets its trial's number; a job that completed without an objective crashed."""
    folder = _job_dir(job)
    record = sweeps.read_record(folder) if folder else None
    if record is None:
        return
    record["trial"] = trial
    if record["status"] == "completed" and value is None:
        record.update(status="crashed", error="no objective: the run returned none")
    sweeps.write_record(folder, record)


class OptunaSweeper(HydraOptunaSweeper or object):
    def sweep(self, arguments):
        import optuna

        optuna.logging.disable_default_handler()  # its coloured handler: its messages go to the run's log instead
        optuna.logging.enable_propagation()
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
        from optuna.trial import TrialState

        impl = self.sweeper
        impl._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(impl._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            distributions.pop(name, None)
        sampler, n_trials = impl.sampler, impl.n_trials
        if isinstance(sampler, functools.partial):  # GridSampler: its grid, and no more trials than it holds
            grid = {name: impl._to_grid_sampler_choices(d) for name, d in distributions.items()}
            sampler, n_trials = sampler(grid), min(n_trials, math.prod(len(v) for v in grid.values()))
        storage = study_storage(impl.storage)
        study = optuna.create_study(
            study_name=impl.study_name,
            storage=storage,
            sampler=sampler,
            directions=impl._get_directions(),
            load_if_exists=True,
        )
        mismatch = _mismatch(study, _definition(self.sweeper.config, distributions, fixed), impl.storage)
        if mismatch:
            run_folder.unclaim(self.sweeper.config.hydra.sweep.dir)  # no job ran: no sweep folder left behind
            refuse(mismatch)
        if study.get_trials(deepcopy=False):  # continued: the sampler's seed would ask its first trials again
            sampler.reseed_rng()
        # Trials whose sweep died (its process is gone from this machine, or it has not beaten for GRACE
        # seconds) are failed and asked again; live trials of other processes on this study are theirs.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _driver_is_gone(trial.user_attrs.get("driver")):
                _interrupted(study, trial)
        optuna.storages.fail_stale_trials(study)
        log.info("study %s (storage %s): %d of %d trials done", study.study_name, impl.storage, _done(study), n_trials)
        while (
            left := n_trials - _done(study) - len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        ) > 0:
            trials = [study.ask() for _ in range(min(impl.n_jobs, left))]
            for trial in trials:
                trial.set_user_attr("driver", f"{socket.gethostname()}:{os.getpid()}")
            overrides = impl._configure_trials(trials, distributions, fixed)
            try:
                with _heartbeat(study, trials):
                    returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
            except BaseException:  # a stop (SIGTERM, Ctrl-C): the trials are asked again by the next sweep
                for trial in trials:
                    _interrupted(study, study._storage.get_trial(trial._trial_id))
                raise
            impl.job_idx += len(returns)
            for trial, job in zip(trials, returns, strict=True):
                value = job._return_value if job.status == JobStatus.COMPLETED else None
                if study._storage.get_trial(trial._trial_id).state.is_finished():
                    log.warning("trial %d was ended by another process (its heartbeat was late): kept", trial.number)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, values=[float(value)])
                else:
                    study.tell(trial, state=TrialState.FAIL)
                _note_trial(job, trial.number, value)
        sweep_dir = Path(self.sweeper.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_results(study, sweep_dir / "optimization_results.yaml")
        sweeps.NOTES.append(_study_summary(study))  # below the sweep's table (vdvae.sweeps.SweepSummary)


def _definition(config, distributions: dict, fixed: dict) -> dict:
    """What a study optimises: its objective and direction, its search space, and the fixed overrides."""
    return {
        "objective": str(config.get("optimized_metric")),
        "direction": str(OmegaConf.to_container(config.hydra.sweeper).get("direction")),
        "search space": {name: repr(d) for name, d in sorted(distributions.items())},
        "fixed overrides": sorted(f"{k}={v}" for k, v in fixed.items()),
    }


def _mismatch(study, definition: dict, storage) -> str:
    """A study continues only the same problem: why the study under this name optimises another ("" if it
    does not). A new study, or one of an earlier version, records this one's definition."""
    recorded = study.user_attrs.get("definition")
    if recorded is None:
        study.set_user_attr("definition", definition)
        return ""
    differences = [key for key in definition if recorded.get(key) != definition[key]]
    if differences:
        key = differences[0]
        theirs, ours = recorded.get(key), definition[key]
        if isinstance(ours, list):  # the overrides in one and not the other
            theirs, ours = sorted(set(theirs or []) - set(ours)), sorted(set(ours) - set(theirs or []))
        return (
            f"hydra.sweeper.study_name={study.study_name} (in {storage}) is a study of another problem: its "
            f"{key} {one_line(str(theirs), 300)}, this command's {one_line(str(ours), 300)}. Continue it with "
            f"the command that made it, or name a new study (hydra.sweeper.study_name=...)"
        )
    return ""


# Seconds between a running trial's heartbeats; a trial silent for GRACE seconds is failed and asked again.
HEARTBEAT = 20
GRACE = 3 * HEARTBEAT


def study_storage(url):
    """Optuna's storage for `url` (None: in memory) with heartbeats, so that several processes may work on one
    study (the file it names was checked before the sweep: vdvae.lifecycle.check_study)."""
    import optuna

    if not isinstance(url, str):
        return url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # waits for the others' writes
    return optuna.storages.RDBStorage(
        url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT, grace_period=GRACE, failed_trial_callback=_interrupted
    )


def _interrupted(study, trial):
    """A trial that did not end (its sweep was stopped, or died): failed, and asked again by a trial that
    names it (`retry_of`; a finished trial's own attributes can no longer change)."""
    from optuna.trial import TrialState, create_trial

    if not trial.state.is_finished():
        study.tell(trial.number, state=TrialState.FAIL)
    retry = create_trial(
        state=TrialState.WAITING, system_attrs={"fixed_params": trial.params}, user_attrs={"retry_of": trial.number}
    )
    study.add_trial(retry)


def _driver_is_gone(driver) -> bool:
    """Whether the sweep process `driver` ("<host>:<pid>") ran on this machine and has ended."""
    host, _, pid = str(driver).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's live process
        return False
    return False


def _done(study) -> int:
    """The trials that ended, less the interrupted ones (asked again)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    # "interrupted": how studies of earlier versions of this sweeper marked them
    return sum(
        1 for t in trials if t.state.is_finished() and t.number not in retried and "interrupted" not in t.user_attrs
    )


@contextlib.contextmanager
def _heartbeat(study, trials):
    """Record the trials' heartbeats while their jobs run (other processes on the study see them alive)."""
    storage = study._storage
    if not storage.is_heartbeat_enabled():
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(HEARTBEAT):
                return

    thread = threading.Thread(target=beat, daemon=True, name="optuna heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_results(study, path: Path):
    """The best trial's parameters and value (null before any trial completed)."""
    from optuna.trial import TrialState

    best = study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None
    results = {
        "name": "optuna",
        "best_params": best.params if best else None,
        "best_value": best.value if best else None,
    }
    OmegaConf.save(OmegaConf.create(results), path)


def _study_summary(study) -> str:
    """The study's best trial and its parameters' importances, in words (also written to
    optimization_results.yaml, as hydra-optuna-sweeper does)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    lines = [f"study {study.study_name}: {len(study.trials)} trials, {len(complete)} complete"]
    if complete:
        best = study.best_trial
        lines.append(f"best trial: #{best.number}, value {best.value:.4f}, parameters {best.params}")
        sweeps.SUMMARY_VALUES.update({"best/value": best.value, "best/trial": best.number})
        try:  # (optuna 2.10's default, fANOVA, fails with scikit-learn >= 1.3: its trees' values changed shape)
            evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
            lines.append("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
            sweeps.SUMMARY_VALUES.update({f"importance/{k}": v for k, v in importances.items()})
        except Exception as error:  # needs two complete trials with varied parameters, and scikit-learn
            lines.append(f"parameter importances: not available ({one_line(error, 120)})")
    return "\n".join(lines)
