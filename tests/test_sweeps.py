"""Sweeps that survive their jobs, started as a user types them (the README's sweep lines with a tiny
model): a diverged or crashed job fails alone and the sweep exits non-zero at its end with a table of
every job; an Optuna study records failed trials and goes on, gives a too-short trial its objective, and
continues after being stopped; the objective's name is checked before the first job. Jobs in parallel
(hydra/launcher=local): one killed outside Python fails alone; SIGTERM to the sweep stops and saves every job."""

import csv
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.run_helpers import TINY_RUN, run, start
from tests.test_reliability import load, wait_for_step

pytestmark = pytest.mark.slow  # sweeps of several processes' worth of jobs

# A tiny run of 30 updates of 32 images: fewer than one epoch of digits (40 batches), so no validation runs.
SHORT = [o for o in TINY_RUN if not o.startswith(("data.batch_size", "model.lr"))] + [
    "data.batch_size=32",
    "trainer.max_steps=30",
    "test=false",
    "model.skip_threshold=-1",  # only non-finite updates are skipped: a large lr diverges
]
# The sampler's seed picks lr 3e-3, 1e5 (diverges), 3e-3 for the first three trials.
OPTUNA = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "model.lr=choice(3e-3,1e5)", *SHORT]
OPTUNA += ["hydra.sweeper.sampler.seed=4"]


def sweep_dirs(cwd):
    return sorted((cwd / "logs" / "train" / "multiruns").glob("*"))


def rows(sweep):
    with open(sweep / "summary.csv") as file:
        return list(csv.DictReader(file))


def test_a_basic_sweep_runs_every_job_writes_its_table_and_exits_nonzero(tmp_path):
    # The README's sweep line, with a learning rate that diverges and one the config check refuses in the job.
    result = run("train.py", tmp_path, "-m", "model.lr=3e-3,1e5,-1", *[o for o in SHORT if o != "logger=csv"])
    assert result.returncode == 1, result.stderr[-3000:]
    (sweep,) = sweep_dirs(tmp_path)
    assert "Error: 2 of 3 jobs failed (crashed: 1, diverged: 1)" in result.stderr
    assert [(r["job"], r["status"]) for r in rows(sweep)] == [("0", "completed"), ("1", "diverged"), ("2", "crashed")]
    completed = rows(sweep)[0]
    assert (
        float(completed["objective"]) == pytest.approx(float(completed["best_val_bpd"])) and completed["steps"] == "30"
    )
    table = (sweep / "summary.md").read_text()
    assert "| 1 | model.lr=100000.0 | diverged |" in table and "model.lr=-1 is not valid" in table
    assert "sweep summary" in result.stdout  # the table in the log too
    assert len(list((sweep / "wandb").glob("offline-run-*"))) == 1  # and as a W&B run of its own
    # One W&B group, the sweep's, for its jobs and its summary; each job named by its number and swept value.
    from vdvae.dashboard import offline_records

    runs = {(r.run.run_group, r.run.display_name, r.run.job_type) for r in offline_records(sweep) if r.HasField("run")}
    assert runs == {
        (sweep.name, "#0 model.lr=0.003", "train"),
        (sweep.name, "#1 model.lr=100000.0", "train"),
        (sweep.name, f"{sweep.name}-summary", "sweep-summary"),
    }, runs  # (job 2, refused at its config check, started no W&B run)


def test_an_optuna_study_survives_diverged_and_short_trials_and_resumes_after_a_stop(tmp_path):
    # Stopped while its third trial runs (SIGTERM, as a scheduler or a user sends it; its steps slowed down,
    # which changes no number, so that the stop lands mid-trial on a fast machine too) ...
    slow = ["+callbacks.slow._target_=tests.job_probes.SlowSteps", "+callbacks.slow.seconds=0.2"]
    proc = start("train.py", tmp_path, *OPTUNA, *slow, env=PROBES, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob("logs/train/multiruns/*/2")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-3000:]
    (first,) = sweep_dirs(tmp_path)
    before = rows_of_study(tmp_path)
    assert [(t["lr"], t["state"]) for t in before] == [(3e-3, "COMPLETE"), (1e5, "FAIL"), (3e-3, "RUNNING")]

    # ... the same command continues it: the two finished trials kept, the third asked again, to 3 in all.
    result = run("train.py", tmp_path, *OPTUNA, *slow, env=PROBES, timeout=600)
    after = rows_of_study(tmp_path)
    assert after[:2] == before[:2], result.stderr[-3000:]
    assert len(after) == 4, result.stderr[-3000:]
    assert after[2]["state"] == "FAIL" and after[3]["lr"] == before[2]["lr"] and len(after) == 4
    assert after[3]["state"] == "COMPLETE" and after[3]["value"] is not None  # validated at its end
    assert result.returncode == 0, result.stderr[-3000:]
    second = sweep_dirs(tmp_path)[-1]
    assert second != first and [r["trial"] for r in rows(second)] == ["3"]
    assert "best trial: #" in (second / "summary.md").read_text()
    assert "best_value" in (second / "optimization_results.yaml").read_text()


def test_two_processes_share_one_study_and_a_study_names_only_its_own_file(tmp_path):
    # Optuna's way to parallelise: the same command twice at once. Neither fails the other's live trial.
    slow = ["+callbacks.slow._target_=tests.job_probes.SlowSteps", "+callbacks.slow.seconds=0.2"]
    study = [*[o for o in OPTUNA if o != "model.lr=choice(3e-3,1e5)"], "model.lr=choice(3e-3,2e-3)", *slow]
    first = start("train.py", tmp_path, *study, env=PROBES, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not list(tmp_path.glob("logs/train/multiruns/*/0")):
        time.sleep(0.1)
    second = run("train.py", tmp_path, *study, env=PROBES, timeout=600)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert [t["state"] for t in rows_of_study(tmp_path)] == ["COMPLETE"] * 3
    assert sum(len(rows(sweep)) for sweep in sweep_dirs(tmp_path)) == 3
    # A study name is a plain name, and its storage no other program's database.
    result = run("train.py", tmp_path, *OPTUNA, "hydra.sweeper.study_name=../../elsewhere")
    assert result.returncode == 1 and "is not a plain name" in result.stderr, result.stderr[-2000:]
    import sqlite3

    other = tmp_path / "notes.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text)")
    before = other.read_bytes()
    result = run("train.py", tmp_path, *OPTUNA, f"hydra.sweeper.storage=sqlite:///{other}")
    assert result.returncode == 1 and "the SQLite database of another program" in result.stderr, result.stderr[-2000:]
    assert other.read_bytes() == before


def rows_of_study(cwd) -> list[dict]:
    """The trials of the one study under `cwd` (its name and file are made from the command)."""
    import optuna

    (db,) = (cwd / "logs" / "train" / "optuna").glob("*.db")
    study = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}")
    return [{"state": t.state.name, "lr": t.params.get("model.lr"), "value": t.value} for t in study.trials]


def test_a_study_is_tied_to_its_problem_and_a_continued_one_asks_new_parameters(tmp_path):
    study = ["-m", "hparams_search=optuna", "model.lr=interval(1e-3,5e-3)", *SHORT, "trainer.max_steps=4"]
    study = [o for o in study if o != "trainer.max_steps=30"]
    first = run("train.py", tmp_path, *study, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # A trial's job resumes in its folder by ckpt_path alone, as a run (its checkpoint's overrides hold
    # hparams_search=optuna, which is not taken: no study starts).
    (job,) = [p for p in sweep_dirs(tmp_path)[0].iterdir() if p.name == "0"]
    resumed = run("train.py", tmp_path, f"ckpt_path={job / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=6")
    assert resumed.returncode == 0 and "resuming with the overrides of the run's command" in resumed.stdout
    assert load(job / "checkpoints" / "last.ckpt")["global_step"] == 6 and not (tmp_path / "logs/train/runs").exists()
    continued = run("train.py", tmp_path, *study, "hydra.sweeper.n_trials=2")  # n_trials is no part of the problem
    assert continued.returncode == 0, continued.stderr[-3000:]
    (db,) = (tmp_path / "logs" / "train" / "optuna").glob("*.db")
    assert db.stem.startswith("val-bpd_callbacks.image_grids.n_samples-4_data.batch_size-32")  # cut, then a hash
    lrs = [t["lr"] for t in rows_of_study(tmp_path)]
    assert len(lrs) == 2 and lrs[0] != lrs[1]  # the continued sampler does not ask the first trial's again
    # Another run length is another problem: a study of its own by default, refused under the first one's name.
    other = [o if o != "trainer.max_steps=4" else "trainer.max_steps=6" for o in study]
    sweeps_before = sweep_dirs(tmp_path)
    refused = run("train.py", tmp_path, *other, "hydra.sweeper.n_trials=1", f"hydra.sweeper.study_name={db.stem}")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
    assert f"hydra.sweeper.study_name={db.stem}" in refused.stderr and "fixed overrides" in refused.stderr
    assert "trainer.max_steps=4" in refused.stderr and "trainer.max_steps=6" in refused.stderr
    assert sweep_dirs(tmp_path) == sweeps_before and len(rows_of_study(tmp_path)) == 2
    own = run("train.py", tmp_path, *other, "hydra.sweeper.n_trials=1")
    assert own.returncode == 0 and len(list(db.parent.glob("*.db"))) == 2, own.stderr[-3000:]


def test_parameter_importances_work_with_the_pinned_stack_and_reach_the_summary(tmp_path):
    import optuna

    from hydra_plugins.vdvae_sweepers.sweepers import _study_summary
    from vdvae import sweeps

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    def objective(trial):
        return 100 * trial.suggest_float("model.lr", 1e-4, 1e-2, log=True) + trial.suggest_int("width", 1, 8) / 100

    study.optimize(objective, n_trials=25)
    text = _study_summary(study)
    importances = re.search(r"parameter importances: model.lr ([\d.]+), width ([\d.]+)", text)
    assert importances and float(importances.group(1)) > float(importances.group(2)), text
    assert sweeps.SUMMARY_VALUES["importance/model.lr"] == pytest.approx(float(importances.group(1)), abs=0.01)


def test_the_summary_gives_test_bpd_and_mean_and_std_over_seeds(tmp_path):
    from vdvae.sweeps import write_summary

    def job(n, lr, seed, bpd):
        overrides = [f"model.lr={lr}", f"seed={seed}"]
        return {"job": str(n), "overrides": overrides, "status": "completed", "objective": bpd, "test_bpd": bpd + 0.1}

    records = [job(0, 1e-3, 0, 3.0), job(1, 1e-3, 1, 3.2), job(2, 2e-3, 0, 4.0), job(3, 2e-3, 1, 4.4)]
    text = write_summary(tmp_path, records).read_text()
    assert "| test_bpd |" in text and "| 3.1000 |" in text
    assert "- model.lr=0.001, 2 seeds: objective 3.1000 ± 0.1414, test_bpd 3.2000 ± 0.1414" in text
    assert "- model.lr=0.002, 2 seeds: objective 4.2000 ± 0.2828, test_bpd 4.3000 ± 0.2828" in text


def test_an_objective_that_training_never_logs_is_refused_before_the_first_job(tmp_path):
    result = run("train.py", tmp_path, *OPTUNA, "optimized_metric=val/bdp")
    assert result.returncode == 1 and "Error: optimized_metric='val/bdp' is not a metric training logs" in result.stderr
    assert "val/bpd" in result.stderr and not (tmp_path / "logs").exists()


def test_the_metrics_an_objective_may_name_are_the_ones_training_logs(tmp_path):
    from tests.run_helpers import run_in_process
    from vdvae.config import metric_names

    run_in_process(tmp_path / "run", *TINY_RUN, "trainer.max_steps=2", "trainer.log_every_n_steps=1")
    logged = set((tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(","))
    assert set(metric_names(test=True)) <= logged | {"test/n_images"}, set(metric_names(test=True)) - logged


# Jobs in parallel, 2 at a time, sleeping after each step so that they can be stopped mid-run; last.ckpt every 2 steps.
LOCAL = ["-m", "hydra/launcher=local", *SHORT, "callbacks.last_checkpoint.every_n_train_steps=2"]
LOCAL += ["+callbacks.slow._target_=tests.job_probes.SlowSteps", "+callbacks.slow.seconds=0.3"]
PROBES = {"PYTHONPATH": str(ROOT)}  # the jobs import tests.job_probes


def job_processes(sweep_pid: int) -> list[int]:
    """The sweep's job processes, oldest first (not multiprocessing's resource tracker)."""
    children = [int(p) for p in Path(f"/proc/{sweep_pid}/task/{sweep_pid}/children").read_text().split()]
    return sorted(p for p in children if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes())


def start_local(cwd: Path, *args: str) -> subprocess.Popen:
    """The local parallel sweep, its output captured (its children are the jobs)."""
    return start("train.py", cwd, *LOCAL, *args, env=PROBES, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def saved_step_2(cwd: Path, jobs: list[str], proc) -> Path:
    """The sweep's folder, once each of `jobs` has saved last.ckpt at step 2 or later."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not sweep_dirs(cwd):
        time.sleep(0.2)
    (sweep,) = sweep_dirs(cwd)
    for job in jobs:
        wait_for_step(sweep / job / "checkpoints" / "last.ckpt", 2, proc)
    return sweep


def test_a_local_parallel_job_killed_outside_python_fails_alone_and_the_sweep_says_how_to_resume_it(tmp_path):
    # Three jobs, two at a time; the first gets SIGKILL mid-run (as from the out-of-memory killer).
    proc = start_local(tmp_path, "trainer.max_steps=200,8,4")
    try:
        sweep = saved_step_2(tmp_path, ["0"], proc)
        os.kill(job_processes(proc.pid)[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert f"Error: 1 of 3 jobs failed (crashed: 1): see {sweep / 'summary.md'}" in err
    statuses = {r["job"]: (r["status"], r["steps"]) for r in rows(sweep)}
    assert statuses == {"0": ("crashed", ""), "1": ("completed", "8"), "2": ("completed", "4")}
    error = rows(sweep)[0]["error"]
    assert error.startswith("job 0 ended with no result (killed by SIGKILL"), error
    command = shlex.split(re.search(r"resume it: (python train\.py .*)", error).group(1))
    step = load(last)["global_step"]
    assert command[-1] == f"ckpt_path={last}" and 2 <= step < 200
    resumed = run("train.py", tmp_path, *command[2:], f"trainer.max_steps={step + 2}", env=PROBES)
    assert resumed.returncode == 0 and "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert load(last)["global_step"] == step + 2


def test_sigterm_to_a_local_parallel_sweep_stops_every_running_job_at_a_step_with_its_last_ckpt(tmp_path):
    proc = start_local(tmp_path, "trainer.max_steps=200,201")
    try:
        sweep = saved_step_2(tmp_path, ["0", "1"], proc)
        jobs = job_processes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM: stopping 2 running jobs" in out + err
    assert len(jobs) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in jobs)  # none left running
    for job in ("0", "1"):
        text = (sweep / job / "train.log").read_text()
        assert f"; {max(1, len(os.sched_getaffinity(0)) // 2)} torch threads" in text  # the cores shared
        saved = re.search(r"stopped at step (\d+): saved", text)
        assert saved and load(sweep / job / "checkpoints" / "last.ckpt")["global_step"] == int(saved.group(1))
