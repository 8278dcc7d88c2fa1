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

import functools
import logging
import math
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from vdvae import sweeps
from vdvae.errors import one_line

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
        storage = impl.storage
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=impl.study_name,
            storage=storage,
            sampler=sampler,
            directions=impl._get_directions(),
            load_if_exists=True,
        )
        # Trials an earlier, stopped sweep left running are failed and asked again with their parameters.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params)
        done = sum(
            1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("interrupted")
        )
        log.info("study %s (storage %s): %d of %d trials done", study.study_name, storage, done, n_trials)
        while done < n_trials:
            trials = [study.ask() for _ in range(min(impl.n_jobs, n_trials - done))]
            overrides = impl._configure_trials(trials, distributions, fixed)
            returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
            impl.job_idx += len(returns)
            for trial, job in zip(trials, returns, strict=True):
                value = job._return_value if job.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, values=[float(value)])
                else:
                    study.tell(trial, state=TrialState.FAIL)
                _note_trial(job, trial.number, value)
            done += len(trials)
        sweep_dir = Path(self.sweeper.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_results(study, sweep_dir / "optimization_results.yaml")
        sweeps.NOTES.append(_study_summary(study))  # below the sweep's table (vdvae.sweeps.SweepSummary)


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
        try:
            importances = optuna.importance.get_param_importances(study)
            lines.append("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
        except Exception as error:  # needs two complete trials with varied parameters, and scikit-learn
            lines.append(f"parameter importances: not available ({one_line(error, 120)})")
    return "\n".join(lines)
