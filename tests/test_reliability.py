"""The fault battery: a run never loses work and a file never runs code.

Runs are processes started as a user starts them (`python /path/to/train.py ...` in a working
directory of its own, run directories chosen by the framework, each in a fresh interpreter), on a tiny
model: kill -9 then resume
bit for bit, SIGTERM's exit status, stale temporary files of interrupted saves, two runs in one second,
a diverging run, and hostile checkpoints and data files."""

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.run_helpers import TINY_RUN, run, run_dirs, start, trained

pytestmark = pytest.mark.slow  # subprocesses: a minute or more each module

# A run of 20 updates over 13-batch epochs (it stops mid-epoch), validating mid-epoch, last.ckpt every 2 updates.
RUN = [
    *TINY_RUN,
    "data.batch_size=100",
    "trainer.max_steps=20",
    "trainer.val_check_interval=5",
    "trainer.check_val_every_n_epoch=null",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "test=false",
]
WITH_WANDB = [*[o for o in RUN if not o.startswith("logger=")], "logger=many"]  # W&B offline, CSV, TensorBoard


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():  # weights, EMA and skip counters
        assert torch.equal(value, b["state_dict"][key]), key
    moments = zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True)
    for x, y in moments:
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


def wait_for_step(last: Path, step: int, proc: subprocess.Popen, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                if load(last)["global_step"] >= step:
                    return
            except Exception:  # being replaced right now
                pass
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step {step} (process status {proc.poll()})")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its final state and metrics."""
    return trained(tmp_path_factory.mktemp("straight"), *RUN)


def test_kill_9_mid_epoch_then_resume_in_place_continues_bit_for_bit(tmp_path, straight):
    proc = start("train.py", tmp_path, *WITH_WANDB, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = run_dirs(tmp_path) or [None]
    deadline = time.time() + 60
    while run_dir is None and time.time() < deadline:
        time.sleep(0.2)
        run_dir = (run_dirs(tmp_path) or [None])[0]
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_step(last, 8, proc)  # killed somewhere after step 8: mid-epoch unless it is exactly 13
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load(last)["global_step"]
    assert 8 <= killed_at < 20

    resumed = run("train.py", tmp_path, f"ckpt_path={last}")  # as the README types it: the run's own overrides
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(tmp_path) == [run_dir]  # resumed in place: same directory
    assert sorted(p.name.startswith("resume_") for p in (run_dir / ".hydra").iterdir()).count(True) == 1
    assert_same_state(load(straight / "checkpoints" / "last.ckpt"), load(last))
    # The CSV log goes on in the same file, with the steps after the checkpoint logged again by the resume.
    rows = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 5 and "val/bpd" in rows[0]
    # One W&B run id across the interruption.
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_saves_at_a_step_boundary_and_resumes_exactly(tmp_path, straight, signum, status):
    proc = start("train.py", tmp_path, *RUN, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not run_dirs(tmp_path) and time.time() < deadline:
        time.sleep(0.2)
    (run_dir,) = run_dirs(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_step(last, 4, proc)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, output[-2000:]
    stopped_at = load(last)["global_step"]
    assert 4 <= stopped_at < 20
    (hint,) = re.findall(r"resume with (ckpt_path=\S+)", output)  # the command it prints, as printed
    resumed = run("train.py", tmp_path, hint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(load(straight / "checkpoints" / "last.ckpt"), load(last))


def test_sigterm_at_an_epochs_last_step_resumes_into_the_next_epoch_exactly(tmp_path, straight):
    # RUN's epochs are 13 batches: SIGTERM as step 13 ends stops the fit loop once the epoch is counted done.
    from tests.conftest import ROOT

    env = {"PYTHONPATH": str(ROOT)}  # the run imports tests.job_probes
    probe = ["+callbacks.sigterm._target_=tests.job_probes.SigtermAt", "+callbacks.sigterm.step=13"]
    stopped = run("train.py", tmp_path, *RUN, *probe, env=env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 13
    # The run's recorded overrides come back with ckpt_path alone, except one that names code: typed again.
    refused = run("train.py", tmp_path, f"ckpt_path={last}", env=env)
    assert refused.returncode == 1 and "names code to run" in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.count("\n") == 1 and load(last)["global_step"] == 13
    resumed = run("train.py", tmp_path, f"ckpt_path={last}", probe[0], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(load(straight / "checkpoints" / "last.ckpt"), load(last))


def test_stale_temp_files_of_interrupted_saves_are_removed(tmp_path):
    from vdvae.callbacks import AtomicCheckpointIO

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.tmp{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".other.ckpt.tmp{os.getppid()}"  # a save in progress in a live process stays
    live.write_bytes(b"in progress")
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists()
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["x"], torch.ones(2))


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    args = [*TINY_RUN, "trainer.max_steps=1", "test=false", "trainer.limit_val_batches=0"]
    procs = [start("train.py", tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-2000:]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and dirs[0].name[:16] == dirs[1].name[:16]  # the same minute, two directories
    assert all((d / "checkpoints" / "last.ckpt").is_file() for d in dirs)


def test_a_run_into_another_runs_directory_is_refused_before_writing(tmp_path, straight):
    config = (straight / ".hydra" / "config.yaml").read_bytes()
    result = run("train.py", tmp_path, *TINY_RUN, f"hydra.run.dir={straight}")
    assert result.returncode != 0
    assert "holds an earlier run" in result.stderr and "ckpt_path=" in result.stderr
    assert (straight / ".hydra" / "config.yaml").read_bytes() == config
    assert not any(p.name.startswith("resume_") for p in (straight / ".hydra").iterdir())


def test_a_diverging_run_stops_saved_with_a_nonzero_status_and_no_crash_in_the_image_grids(tmp_path):
    result = run(
        "train.py",
        tmp_path,
        *TINY_RUN,
        "model.lr=1e6",
        "model.warmup_steps=1",
        "model.skip_threshold=-1",  # off: only non-finite updates are skipped
        "model.max_consecutive_skips=4",
        "data.batch_size=100",
        "trainer.max_steps=60",
        "trainer.val_check_interval=3",
        "trainer.check_val_every_n_epoch=null",
    )
    assert result.returncode != 0
    assert "consecutive updates were skipped" in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    checkpoint = load(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == int(checkpoint["state_dict"]["attempted_steps"])  # the latest state
    assert int(checkpoint["state_dict"]["consecutive_skips"]) == 4
    assert all(torch.isfinite(v).all() for k, v in checkpoint["state_dict"].items() if v.is_floating_point())


@pytest.mark.parametrize(
    "args,message",
    [
        (["model.lr=-1"], "model.lr=-1 is not valid: it must be a finite number > 0"),
        (["data.batch_size=2.5"], "data.batch_size=2.5 is not valid: it must be an integer >= 1"),
        (["data.batch_size=abc"], "data.batch_size='abc' is not valid"),
        (["trainer.devices=999", "trainer.accelerator=cpu"], "trainer.devices=999 on the CPU would start 999"),
        (["ckpt_path=missing.ckpt"], "checkpoint not found"),
        (["model.lr=nan"], "model.lr=nan is not valid: no option takes NaN"),
        (["model.lr=inf"], "model.lr=inf is not valid: it must be a finite number > 0"),
        (["data.eval_batch_size=nan"], "data.eval_batch_size=nan is not valid"),
        (["seed=-1"], "seed=-1 is not valid: it must be an integer >= 0 and <= 4294967295"),
    ],
)
def test_bad_values_are_refused_by_the_check_that_runs_before_the_run_directory(args, message, capsys):
    from hydra.core.hydra_config import HydraConfig

    from tests.conftest import compose_config
    from vdvae.lifecycle import RunDirGuard

    cfg = compose_config(*TINY_RUN, *args, config_name="train")
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(SystemExit) as refused:
        RunDirGuard().on_run_start(config=cfg)
    assert refused.value.code == 1 and message in capsys.readouterr().err


def test_a_bad_value_fails_as_typed_in_one_short_message_before_a_run_directory_exists(tmp_path):
    result = run("train.py", tmp_path, *TINY_RUN, "model.lr=-1")
    assert result.returncode != 0
    assert "Error: model.lr=-1 is not valid: it must be a finite number > 0" in result.stderr
    assert len(result.stderr.splitlines()) < 30  # the message, not a long traceback
    assert not (tmp_path / "logs").exists()


def test_resume_from_a_corrupt_or_mismatched_checkpoint_names_the_file_and_keys(tmp_path, straight):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((straight / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    result = run("train.py", tmp_path, *TINY_RUN, f"ckpt_path={corrupt}")
    assert result.returncode != 0 and f"{corrupt} is not a readable checkpoint" in result.stderr
    wider = run("train.py", tmp_path, *TINY_RUN, "model.vae.width=24", f"ckpt_path={straight}/checkpoints/last.ckpt")
    assert wider.returncode != 0
    assert "does not fit the configured model" in wider.stderr and "of another shape" in wider.stderr
    assert "and " in wider.stderr and len(wider.stderr.splitlines()) < 30
    assert not (tmp_path / "logs").exists() or not run_dirs(tmp_path)


def test_a_resumed_optimizer_state_must_fit_the_parameters_it_belongs_to():
    """A moment of another shape would be broadcast into the whole step's flat buffers (and break the eager
    step mid-run): a resume refuses it before the run, naming it, as it does weights."""
    from tests.conftest import TINY_VAE
    from vdvae import VDVAEModule
    from vdvae.checkpoints import CheckpointError
    from vdvae.resume import check_fits

    module = VDVAEModule(TINY_VAE)
    first = next(module.vae.parameters())
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first), "exp_avg_sq": torch.zeros_like(first)}

    def checkpoint(state):
        return {"state_dict": module.state_dict(), "optimizer_states": [{"state": state, "param_groups": []}]}

    check_fits(checkpoint({0: moments}), "good.ckpt", module)  # fits: no error
    check_fits(checkpoint({}), "fresh.ckpt", module)  # no state yet (saved before the first update)
    refused = {
        "a moment broadcastable into the parameter": (
            {0: {**moments, "exp_avg": torch.zeros(1)}},
            "exp_avg of parameter 0 (1,)",
        ),
        "a step count that is not one number": ({0: {**moments, "step": torch.zeros(2)}}, "step of parameter 0 (2,)"),
        "a parameter the model lacks": ({10_000: moments}, "unexpected"),
        "a moment of another dtype": (
            {0: {**moments, "exp_avg": torch.zeros_like(first, dtype=torch.float64)}},
            "dtype",
        ),
        "no dictionary": ([moments], "not one dictionary of tensors per parameter"),
        "another optimizer's state": (
            {0: {"step": moments["step"], "exp_avg": moments["exp_avg"], "exp_inf": moments["exp_avg"]}},
            "its optimizer state is adamax's (exp_inf), and model.optimizer=adamw",
        ),
    }
    for case, (state, message) in refused.items():
        with pytest.raises(CheckpointError, match="does not fit the configured model") as error:
            check_fits(checkpoint(state), "bad.ckpt", module)
        assert message in str(error.value), case


# Hostile files: each would write `marker` if anything in it ran.


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_code_in_its_pickle_runs_nothing_anywhere(tmp_path, straight):
    marker = tmp_path / "ran"
    checkpoint = load(straight / "checkpoints" / "last.ckpt")
    checkpoint["payload"] = _WritesMarker(marker)
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    for script, args in [
        ("train.py", [*TINY_RUN, f"ckpt_path={hostile}"]),
        ("eval.py", [f"ckpt_path={hostile}", "logger=csv"]),
        ("sample.py", [f"ckpt_path={hostile}"]),
        ("import_original.py", ["--preset", "tiny", "--model", str(hostile), "--out", str(tmp_path / "o.ckpt")]),
    ]:
        result = run(script, tmp_path, *args)
        assert result.returncode != 0, script
        assert not marker.exists(), script
        assert "hostile.ckpt" in result.stderr, (script, result.stderr[-1500:])
        # It says why, and not torch's advice to load the file with weights_only=False (which would run it).
        assert "asks to run code" in result.stderr and "weights_only" not in result.stderr, result.stderr[-1500:]
    assert not (tmp_path / "o.ckpt").exists()


def test_a_checkpoint_whose_data_config_names_code_is_refused(tmp_path, straight):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    checkpoint = load(straight / "checkpoints" / "last.ckpt")
    checkpoint["data_config"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    for script in ("eval.py", "sample.py"):
        extra = "logger=csv" if script == "eval.py" else "mode=encode"
        result = run(script, tmp_path, f"ckpt_path={hostile}", extra)
        assert result.returncode != 0
        assert "not one of this package's data modules" in result.stderr
        assert victim.read_text() == "precious"
    checkpoint["data_config"] = {"_target_": "vdvae.data.DigitsDataModule", "root": {"_target_": "builtins.open"}}
    torch.save(checkpoint, hostile)
    result = run("eval.py", tmp_path, f"ckpt_path={hostile}", "logger=csv")
    assert result.returncode != 0 and "not plain data" in result.stderr


def test_a_cifar_batch_with_code_in_its_pickle_is_refused(tmp_path):
    from tests.fixtures import make_cifar10
    from vdvae.data.cifar10 import read_cifar_batch

    root = make_cifar10(tmp_path / "data")
    marker = tmp_path / "ran"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _WritesMarker(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="refused posix.system"):
        read_cifar_batch(batch)
    assert not marker.exists()
    good = root / "cifar-10-batches-py" / "data_batch_2"
    assert read_cifar_batch(good).shape == (12, 3, 32, 32) and read_cifar_batch(good).dtype == np.uint8


def test_slurm_preemption_saves_requeues_and_the_requeued_job_resumes(tmp_path, straight):
    # A sweep job under submitit: USR2 (pre-emption, or the time limit coming) must save last.ckpt at a step
    # boundary and then hand over to submitit's handler, which requeues the job with its original overrides
    # into the same job directory (the sweep dir is fixed here as the requeued job would find it).
    marker = tmp_path / "requeued"
    job = ["-m", *RUN, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {"SLURM_JOB_ID": "1234", "FAKE_REQUEUE_MARKER": str(marker)}
    proc = start(
        "tests/fake_submitit_job.py", tmp_path, *job, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    last = tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt"
    wait_for_step(last, 4, proc)
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert marker.read_text() == "requeued" and proc.returncode != 0, stderr[-2000:]
    assert 4 <= load(last)["global_step"] < 20
    requeued = run("tests/fake_submitit_job.py", tmp_path, *job, env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resuming from it" in requeued.stdout + requeued.stderr
    assert_same_state(load(straight / "checkpoints" / "last.ckpt"), load(last))


@pytest.mark.parametrize(
    "args, message",
    [
        (["mode=foo"], "mode='foo': choose one of samples"),
        (["mode=decode"], "mode=decode needs latents=<file written by mode=encode>"),
        (["mode=interpolate", "inputs=[a.png]"], "mode=interpolate needs two images or more; the inputs hold 1"),
    ],
    ids=["unknown-mode", "decode-without-latents", "interpolate-one-image"],
)
def test_a_bad_sampling_request_fails_and_leaves_no_run_directory(tmp_path, straight, args, message):
    from tests.fixtures import write_pngs

    write_pngs(tmp_path / "inputs", 1, 8)
    (tmp_path / "inputs" / "00000.png").rename(tmp_path / "a.png")
    result = run("sample.py", tmp_path, f"ckpt_path={straight}/checkpoints/last.ckpt", *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert run_dirs(tmp_path, "sample") == []


# Nothing outside a run's own files is ever deleted.


def test_a_crafted_record_of_kept_checkpoints_deletes_nothing_outside_the_run(tmp_path, straight):
    # The ModelCheckpoint state in last.ckpt names the kept "best" checkpoint as <run>/checkpoints/../../../victim,
    # scored worse than anything, so that Lightning would remove it at the resumed run's first new best.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("precious")
    first = run("train.py", tmp_path, *RUN, "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = load(last)
    (key,) = [k for k in checkpoint["callbacks"] if "best_k_models" in checkpoint["callbacks"][k]]
    crafted = str(run_dir / "checkpoints" / os.path.relpath(victim, run_dir / "checkpoints"))  # .../../victim
    state = checkpoint["callbacks"][key]
    state.update(best_k_models={crafted: torch.tensor(1e9)}, kth_best_model_path=crafted, kth_value=torch.tensor(1e9))
    state.update(best_model_path=crafted, best_model_score=torch.tensor(1e9))
    torch.save(checkpoint, last)
    resumed = run("train.py", tmp_path, *RUN, "trainer.max_steps=12", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (victim / "thesis.tex").read_text() == "precious"
    said = resumed.stdout + resumed.stderr
    assert "which is not a file in" in said and "forgotten, never loaded or removed" in said
    assert any(load(p)["global_step"] > 6 for p in (run_dir / "checkpoints").glob("best-*.ckpt"))  # a new best


def test_kept_checkpoints_restored_from_a_file_are_confined_to_the_checkpoints_folder(tmp_path):
    from vdvae.callbacks import AtomicCheckpointIO, BestCheckpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    own = folder / "best-1.ckpt"
    own.write_bytes(b"x")
    outside = tmp_path / "outside.ckpt"
    outside.write_bytes(b"y")
    (folder / "link.ckpt").symlink_to(outside)
    (folder / "sub").mkdir()
    crafted = [
        str(folder / ".." / "checkpoints" / ".." / "x.ckpt"),
        str(outside),
        str(folder / "link.ckpt"),
        str(folder / "sub"),
    ]
    callback = BestCheckpoint(dirpath=str(folder), monitor="val/bpd", save_top_k=2)
    state = callback.state_dict()
    state.update(best_k_models={str(own): torch.tensor(1.0), **{p: torch.tensor(2.0) for p in crafted}})
    state.update(best_model_path=crafted[0], kth_best_model_path=crafted[1], best_model_score=torch.tensor(0.5))
    callback.load_state_dict(state)
    assert list(callback.best_k_models) == [str(own)] and callback.kth_best_model_path == str(own)
    assert callback.best_model_path == "" and callback.best_model_score is None
    # The trainer's checkpoint plugin removes files only, whatever Lightning asks.
    AtomicCheckpointIO().remove_checkpoint(folder / "sub")
    assert (folder / "sub").is_dir()


def test_a_run_that_fails_in_a_folder_of_the_users_leaves_the_folder(tmp_path):
    # The user's folder holds a file named as the run's log: refused before anything is written.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.log").write_text("my notes")
    no_data = [o for o in TINY_RUN if o != "data=digits"]
    no_data += ["data=image_folder", "data.image_size=8", "data.channels=1", f"data.root={tmp_path / 'none'}"]
    result = run("train.py", tmp_path, *no_data, f"hydra.run.dir={mine}")
    assert result.returncode != 0 and "not this run's" in result.stderr, result.stderr[-2000:]
    assert (mine / "train.log").read_text() == "my notes" and len(list(mine.iterdir())) == 1
    # An empty folder of the user's is written into; the run fails its data check inside the task and
    # leaves the folder, which it did not create.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("train.py", tmp_path, *no_data, f"hydra.run.dir={empty}")
    assert result.returncode != 0 and "no data found" in result.stderr, result.stderr[-2000:]
    assert empty.is_dir()
    # A run directory that the failed run made itself is removed.
    result = run("train.py", tmp_path, *no_data)
    assert result.returncode != 0 and "Error: " in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert run_dirs(tmp_path) == []


def test_damaged_generator_states_are_refused_before_the_run_and_last_ckpt_is_never_rewritten(tmp_path, straight):
    checkpoint = load(straight / "checkpoints" / "last.ckpt")
    checkpoint["rng_states"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)
    bogus = tmp_path / "bogus.ckpt"
    torch.save(checkpoint, bogus)
    before = bogus.read_bytes()
    result = run("train.py", tmp_path, *RUN, f"ckpt_path={bogus}")
    assert result.returncode != 0 and "random number generator states cannot be restored" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert bogus.read_bytes() == before and not (tmp_path / "logs").exists()


def test_a_failure_before_the_first_step_leaves_last_ckpt_and_a_failed_save_hides_nothing(tmp_path, caplog):
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vdvae.callbacks import LastCheckpoint
    from vdvae.checkpoints import save_atomically

    saves = []
    save = lambda path, weights_only=False: saves.append(path)  # noqa: E731
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), global_step=7, save_checkpoint=save, world_size=1)
    callback = LastCheckpoint(str(tmp_path))
    idle = SimpleNamespace(applying_update=False)  # the module between two updates
    callback.on_exception(trainer, idle, RuntimeError("restoring the optimizer failed"))
    assert saves == []  # resumed at step 7, failed before training: last.ckpt already holds step 7
    callback._stepped = True
    callback.on_exception(trainer, SimpleNamespace(applying_update=True), KeyboardInterrupt())
    assert saves == [] and "in the middle of update 7: not saved" in caplog.text  # a second Ctrl-C mid-update
    trainer.world_size = 2  # one process of two failed: the others are in the step, a save would wait for them
    callback.on_exception(trainer, idle, RuntimeError("one rank"))
    assert saves == [] and "in one of 2 processes: not saved" in caplog.text
    callback.on_exception(trainer, idle, SIGTERMException())  # every process stops at the same step boundary
    assert saves == [callback.path]
    trainer.world_size = 1

    def unwritable(path, weights_only=False):
        raise PermissionError(f"[Errno 13] Permission denied: '{path}'")

    callback._stepped, trainer.save_checkpoint = True, unwritable
    callback.on_exception(trainer, idle, RuntimeError("the real failure"))  # reported by the caller, not hidden
    assert "could not be saved" in caplog.text and "Permission denied" in caplog.text
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(OSError, match=r"cannot save the checkpoint .*a_file/last.ckpt.* is writable"):
        save_atomically({"x": 1}, blocked / "last.ckpt")


def test_eval_refuses_nan_weights_in_one_line_and_stops_on_sigterm_with_143_and_no_results(tmp_path, straight):
    checkpoint = load(straight / "checkpoints" / "last.ckpt")
    name = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("ema.") and v.is_floating_point())
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    result = run("eval.py", tmp_path, f"ckpt_path={tmp_path / 'nan.ckpt'}", "logger=csv")
    assert result.returncode == 1 and "hold NaN or inf" in result.stderr and "best-" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert run_dirs(tmp_path, "eval") == []

    # SIGTERM once the trainer exists: exit 143 at once, no eval.json, one line.
    ckpt = straight / "checkpoints" / "last.ckpt"
    proc = start(
        "eval.py",
        tmp_path,
        f"ckpt_path={ckpt}",
        "logger=csv",
        "iw_samples=2000",
        "trainer=cpu",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logs = list((tmp_path / "logs" / "eval" / "runs").glob("*/eval.log"))
        if logs and "GPU available" in logs[0].read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stdout + stderr
    assert run_dirs(tmp_path, "eval") == []  # it held only its config, its log and an empty CSV folder


def test_a_checkpoint_of_weights_that_hold_no_data_is_refused(tmp_path, straight):
    from vdvae.checkpoints import CheckpointError, load_module

    checkpoint = load(straight / "checkpoints" / "last.ckpt")
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = torch.empty(checkpoint["state_dict"][name].shape, device="meta")
    torch.save(checkpoint, tmp_path / "meta.ckpt")
    with pytest.raises(CheckpointError, match=f"not dense CPU tensors of the model's dtype: {re.escape(name)}"):
        load_module(tmp_path / "meta.ckpt")


def test_a_folder_output_is_swapped_whole_even_when_sigterm_arrives_between_its_two_moves(tmp_path, monkeypatch):
    from vdvae import files
    from vdvae.errors import Terminated
    from vdvae.lifecycle import StopController

    out = tmp_path / "pngs"
    out.mkdir()
    (out / "old.png").write_text("old")
    remove = files.shutil.rmtree

    def remove_then_sigterm(path, *args, **kwargs):  # the old folder is gone, the new one not yet moved in
        remove(path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files.shutil, "rmtree", remove_then_sigterm)
    with pytest.raises(Terminated):
        with StopController(), files.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "new.png").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.png"]  # handled after the swap: the new folder, whole
    assert files.write_atomically(tmp_path / "report.json", "{}").read_text() == "{}"


def test_a_second_ctrl_c_stops_training_at_once_as_interrupted_which_lightning_passes_on(tmp_path):
    # Lightning turns a KeyboardInterrupt into exit status 1; Interrupted reaches the command (130).
    from tests.run_helpers import run_in_process
    from vdvae.errors import Interrupted

    probe = ["+callbacks.stop._target_=tests.job_probes.SecondCtrlCAt", "+callbacks.stop.step=3"]
    with pytest.raises(Interrupted):
        run_in_process(tmp_path, *TINY_RUN, "trainer.max_steps=20", *probe)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3  # between updates: saved
