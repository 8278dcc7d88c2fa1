"""The SLURM launcher (hydra/launcher=slurm) on a real cluster: this machine as a SLURM cluster of one
node (scripts/slurm-cluster, started by the `cluster` fixture and stopped again if it started it;
skipped where it cannot start, except under CI=true, where that fails).

Commands run as a user types them, each from a working directory of its own (tests/run_helpers.py),
never with a hand-set run or sweep directory; the jobs get the tiny model on the CPU, and their CPUs and
memory from the launcher's defaults for a CPU trainer (1 CPU and 4 GB a task). The cluster has two
CPUs: a job with a one-minute time limit runs beside the other cases (it mostly sleeps), which take the
other CPU one after the other. Jobs of several tasks on several nodes, DDP's equality with one machine and
`scontrol requeue` of a running job: tests/test_slurm_2nodes.py."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.run_helpers import run, run_dirs, start
from tests.test_readme import assert_run, readme_commands, words
from tests.test_reliability import RUN, assert_same_state, load, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = ["bash", str(ROOT / "scripts" / "slurm-cluster")]
# One thread everywhere: the jobs get one (the launcher sets OMP_NUM_THREADS to their CPUs per task), and
# the runs they are compared with bit for bit must do the same arithmetic.
ENV = {"OMP_NUM_THREADS": "1"}
PROBES = {**ENV, "PYTHONPATH": str(ROOT)}  # the jobs import tests.job_probes and tests.ddp_probe
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug"]
# 110 updates, last.ckpt every 2, validation every 10; the jobs sleep after each step (tests.job_probes).
LONG = [*RUN, "trainer.max_steps=110", "trainer.val_check_interval=10"]


def submit(cwd: Path, *args: str, env=PROBES) -> subprocess.Popen:
    """`python train.py -m hydra/launcher=slurm ...` started in `cwd`, its output captured."""
    return start("train.py", cwd, *SLURM, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def slow(seconds: float, record: Path) -> list[str]:
    target = "+callbacks.slow._target_=tests.job_probes.SlowSteps"
    return [target, f"+callbacks.slow.seconds={seconds}", f"+callbacks.slow.record={record}"]


def slurm_cluster(*options: str):
    """The cluster `scripts/slurm-cluster start *options` makes, ready for jobs while the generator is
    suspended, with SLURM_CONF naming it for sbatch and squeue; stopped again if it started it. Skips where
    it cannot start, except under CI=true, where that fails."""
    name = " ".join(["SLURM cluster", *options])
    was_ready = subprocess.run([*CLUSTER, "status", *options], capture_output=True).returncode == 0
    began = time.time()
    started = subprocess.run([*CLUSTER, "start", *options], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        why = (started.stderr.strip() or started.stdout.strip() or "no output").splitlines()[-1]
        if os.environ.get("CI") == "true":
            pytest.fail(f"the {name} did not start: {why}")
        pytest.skip(f"no {name} on this machine: {why}")
    print(f"{name} ready in {time.time() - began:.0f} s ({'running already' if was_ready else 'started'})")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = re.search(r"SLURM_CONF=(\S+)", started.stdout).group(1)
    yield
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_ready:
        subprocess.run([*CLUSTER, "stop", *options], capture_output=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """This machine as a cluster of one node."""
    yield from slurm_cluster()


def sweep_of(cwd: Path, task="train", proc=None, timeout=120) -> Path:
    """The sweep directory a command in `cwd` made, once its first job is submitted."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        submitted = list((cwd / "logs" / task / "multiruns").glob("*/.submitit/*/*_submitted.pkl"))
        if submitted:
            return submitted[0].parents[2]
        time.sleep(0.2)
    raise AssertionError(f"no job submitted from {cwd}")


def job_ids(sweep: Path) -> list[str]:
    """The SLURM ids of a sweep's jobs (`<id>`, or `<array id>_<index>`), in job order."""
    names = [p.name.removesuffix("_submitted.pkl") for p in (sweep / ".submitit").glob("*/*_submitted.pkl")]
    return sorted(names, key=lambda name: [int(part) for part in name.split("_")])


def cancel(cwd: Path):
    """Cancel whatever the commands run in `cwd` left on the cluster (a test that failed midway)."""
    for sweep in (cwd / "logs").glob("*/multiruns/*"):
        subprocess.run(["scancel", *job_ids(sweep)], capture_output=True)


def output(result) -> str:
    return result.stdout + result.stderr


def job_log(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text()


def scores_of(run_dir: Path) -> dict:
    (metrics,) = run_dir.glob("csv/**/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return {k: v for row in rows for k, v in row.items() if k.startswith("test/") and v}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of LONG, on this machine: what the interrupted jobs must end with."""
    cwd = tmp_path_factory.mktemp("straight")
    result = run("train.py", cwd, *LONG, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(cwd)
    return load(run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def time_limited(tmp_path_factory):
    """A sweep of one job with a one-minute time limit, started before the cases that run beside it."""
    cwd = tmp_path_factory.mktemp("time_limited")
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=1"]  # SLURM signals up to 60 s early
    proc = submit(cwd, *LONG, *slow(0.5, cwd / "starts"), *limit)
    yield proc, cwd, time.time()
    proc.kill()
    cancel(cwd)


def readme_slurm_line(cwd: Path, *fitted: str) -> Path:
    """The README's SLURM line as typed in `cwd`, with `fitted` (the cluster's partition, nodes and devices)
    and the tiny model's short run on the CPU added; it must complete. Its sweep folder, after checking
    each job's run folder (last.ckpt, best checkpoint, config, log, one offline W&B run) and learning rate."""
    (command,) = [c for c in readme_commands() if "hydra/launcher=slurm" in c]
    small = ["model=tiny", "data=digits", "data.batch_size=50", "callbacks.image_grids.n_samples=2"]
    small += ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"]
    began = time.time()
    try:
        result = run("train.py", cwd, *words(command)[2:], *fitted, *small, "trainer.enable_progress_bar=false")
    finally:
        cancel(cwd)
    print(f"README SLURM sweep: {time.time() - began:.0f} s")
    assert result.returncode == 0, output(result)[-3000:]
    (sweep,) = (cwd / "logs" / "imagenet32" / "multiruns").iterdir()
    assert len(job_ids(sweep)) == 2
    rows = {row["job"]: row for row in csv.DictReader((sweep / "summary.csv").open())}
    assert [rows[j]["status"] for j in ("0", "1")] == ["completed", "completed"]
    for job, lr in (("0", 1e-4), ("1", 1.5e-4)):
        assert_run(sweep / job)
        assert "SLURM job" in job_log(sweep / job) and (sweep / job / "job.json").is_file()
        assert f"lr: {lr}" in (sweep / job / ".hydra" / "config.yaml").read_text()
        assert list((sweep / job / "checkpoints").glob("best-*.ckpt"))
    return sweep


def test_the_readme_slurm_sweep_runs_its_two_jobs_on_the_cluster(tmp_path, time_limited):
    # On this cluster's partition, the CPU trainer on one node.
    readme_slurm_line(
        tmp_path, "hydra.launcher.partition=debug", "trainer=cpu", "trainer.num_nodes=1", "trainer.devices=1"
    )


def test_a_config_error_found_in_the_job_fails_the_sweep_in_seconds_with_its_message(tmp_path, time_limited):
    # The tiny model on Fashion-MNIST's 28 x 28 images: the job's config check refuses it.
    began = time.time()
    try:
        result = run("train.py", tmp_path, *SLURM, *RUN, "data=fashion_mnist", timeout=180)
    finally:
        cancel(tmp_path)
    took = time.time() - began
    print(f"failing job: {took:.0f} s")
    message = "model.vae.image_size=8 does not match data.image_size=28"
    assert result.returncode != 0 and message in output(result), output(result)[-3000:]
    record = json.loads((sweep_of(tmp_path) / "0" / "job.json").read_text())  # the job's record holds it
    assert record["status"] == "crashed" and message in record["error"]
    assert took < 120


def kill_9(job: str):
    """SIGKILL to the job's Python process, as the out-of-memory killer sends it (scancel would send
    SIGTERM first, which the job answers by saving and reporting)."""
    raw_id = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True).stdout.strip()
    listed = subprocess.run(["scontrol", "listpids", raw_id], capture_output=True, text=True, check=True).stdout
    pids = [int(line.split()[0]) for line in listed.splitlines()[1:]]
    python = [pid for pid in pids if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert python, listed
    for pid in python:
        os.kill(pid, signal.SIGKILL)


def test_a_job_killed_outside_python_fails_alone_and_the_sweep_says_how_to_resume_it(tmp_path, time_limited):
    # Two jobs; the first gets SIGKILL mid-run, as from the out-of-memory killer: it leaves no result, the
    # second still completes, and the sweep ends with its summary, naming the dead job and its last.ckpt.
    steps = [o for o in RUN if not o.startswith("trainer.max_steps=")]
    proc = submit(tmp_path, *steps, "trainer.max_steps=110,4", *slow(0.2, tmp_path / "starts"))
    try:
        sweep = sweep_of(tmp_path, proc=proc)
        last = sweep / "0" / "checkpoints" / "last.ckpt"
        wait_for_step(last, 4, proc, timeout=300)
        killed = job_ids(sweep)[0]
        kill_9(killed)
        began = time.time()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        cancel(tmp_path)
    print(f"killed job reported after {time.time() - began:.0f} s")
    assert proc.returncode == 1 and "Traceback" not in err, (out + err)[-3000:]
    assert f"Error: 1 of 2 jobs failed (crashed: 1): see {sweep / 'summary.md'}" in err, err[-3000:]
    rows = {row["job"]: row for row in csv.DictReader((sweep / "summary.csv").open())}
    assert rows["1"]["status"] == "completed" and rows["1"]["steps"] == "4"
    assert rows["0"]["status"] == "crashed" and f"SLURM job {killed} ended with no result" in rows["0"]["error"]
    assert_resumes_as_told(rows["0"]["error"], tmp_path, last, 4)


def assert_resumes_as_told(message: str, cwd: Path, last: Path, at_least: int):
    """The command the message gives resumes the run from `last` (two more steps, to be quick)."""
    told = re.search(r"resume it: (python train\.py .*?)(;|$)", message, re.MULTILINE)
    assert told, message[-3000:]
    command = shlex.split(told.group(1))
    step = load(last)["global_step"]
    assert command[-1] == f"ckpt_path={last}" and at_least <= step < 110
    resumed = run("train.py", cwd, *command[2:], f"trainer.max_steps={step + 2}", env=PROBES)
    said = output(resumed)
    assert resumed.returncode == 0 and "Restoring states from the checkpoint" in said, said[-3000:]
    assert load(last)["global_step"] == step + 2


def mid_run(cwd: Path, proc: subprocess.Popen, step: int, command: list[str], timeout: int):
    """Once the sweep's job has saved `step`, `command <job id>`; then the sweep to its end. The sweep's
    folder, its job's last.ckpt, the job id, the step last.ckpt held when the command ran, when it ran,
    and the sweep's output."""
    try:
        sweep = sweep_of(cwd, proc=proc)
        last = sweep / "0" / "checkpoints" / "last.ckpt"
        wait_for_step(last, step, proc, timeout=300)
        before = load(last)["global_step"]
        (job,) = job_ids(sweep)
        subprocess.run([*command, job], check=True)
        ran = time.time()
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        cancel(cwd)
    return sweep, last, job, before, ran, out, err


def test_scancel_of_a_running_job_is_reported_and_its_last_ckpt_resumes_it(tmp_path, time_limited):
    proc = submit(tmp_path, *LONG, *slow(0.2, tmp_path / "starts"))
    sweep, last, job, _, cancelled, out, err = mid_run(tmp_path, proc, 6, ["scancel"], timeout=120)
    print(f"scancel reported after {time.time() - cancelled:.0f} s")
    assert proc.returncode != 0, err[-3000:]
    assert f"SLURM stopped job {job} without requeueing it" in out + err, (out + err)[-3000:]
    assert_resumes_as_told(out + err, tmp_path, last, 6)
    # Or on the cluster by ckpt_path alone: its job starts from last.ckpt with the run's recorded overrides (the
    # probe's _target_ typed again: a checkpoint never names code), in a sweep folder of its own.
    step = load(last)["global_step"]
    typed = [f"ckpt_path={last}", f"trainer.max_steps={step + 2}", slow(0, tmp_path / "again")[0]]
    again = submit(tmp_path, *typed)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, (out + err)[-3000:]
    (resumed,) = [p for p in sweep.parent.iterdir() if p != sweep]
    assert "resuming with the overrides of the run's command" in job_log(resumed / "0")
    assert load(resumed / "0" / "checkpoints" / "last.ckpt")["global_step"] == step + 2


def test_a_time_limit_mid_run_saves_requeues_and_the_job_ends_as_the_straight_run(time_limited, straight):
    proc, cwd, began = time_limited
    out, err = proc.communicate(timeout=600)
    print(f"time-limited job: {time.time() - began:.0f} s")
    assert proc.returncode == 0, (out + err)[-3000:]
    sweep = sweep_of(cwd)
    log = job_log(sweep / "0")
    restarts = [int(n) for n in re.findall(r"SLURM_RESTART_COUNT=(\d+)", log)]
    assert max(restarts) >= 1 and "SIGUSR2: stopping at the next step to save" in log, log[-3000:]
    assert "resuming from it" in log and "SLURM auto-requeueing enabled" not in log  # submitit's requeue only
    # Each start of training (one that USR2 met before training began has none): from 0, then from what
    # the one before saved, never from scratch again.
    starts = [tuple(map(int, line.split())) for line in (cwd / "starts").read_text().splitlines()]
    steps, restarts = [step for step, _ in starts], [restart for _, restart in starts]
    assert steps[0] == 0 and len(starts) >= 2 and all(step > 0 for step in steps[1:]) and steps == sorted(steps)
    assert restarts == sorted(set(restarts))
    assert_same_state(straight, load(sweep / "0" / "checkpoints" / "last.ckpt"))
