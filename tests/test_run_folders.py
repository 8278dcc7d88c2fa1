"""A run touches only what is its own, as the user types the commands: a run writes only into a new (or
empty) folder or its own, whatever path names it (`..`, a link's `..`); nothing of a user's is deleted or
replaced; a sweep starts in a new folder and gives each job its own; a finished run resumes whatever step
it ended on; a checkpoint's counters are checked against its step before anything is written."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.run_helpers import TINY_RUN, run, run_dirs, start, trained

pytestmark = pytest.mark.slow  # subprocesses

# Two whole epochs of 26 updates (1,300 training images of digits in batches of 50): the run ends on an
# epoch's last step, where the final validation replaces the best checkpoint after that step was saved.
TWO_EPOCHS = [*TINY_RUN, "trainer.max_steps=52", "test=false"]


def tree(folder) -> dict:
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_refusal(result, *words):
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("finished"), *TWO_EPOCHS)


@pytest.fixture
def users_folder(tmp_path):
    """A folder of the user's: notes named as a run's log, photos, a folder of their own."""
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "sub").mkdir()
    (mine / "train.log").write_text("my notes")
    (mine / "images" / "photo1.jpg").write_bytes(b"\xff\xd8 my photo")
    (mine / "sub" / "data.txt").write_text("keep")
    return mine


def test_a_run_never_writes_into_a_users_folder_through_dot_dot(tmp_path, users_folder, finished):
    before = tree(users_folder)
    # A run that would fail anyway (a batch larger than the data), into `<user folder>/nope/..`.
    args = ["model=tiny", "data=digits", "trainer=cpu", "logger=csv", "data.batch_size=100000"]
    result = run("train.py", tmp_path, *args, f"hydra.run.dir={users_folder}/nope/..")
    one_line_refusal(result, f"hydra.run.dir={users_folder} ", "not this run's")
    assert tree(users_folder) == before and not (users_folder / "nope").exists()
    # eval, sample and compress alike; and an earlier run's folder, named through `..` too.
    last = finished / "checkpoints" / "last.ckpt"
    earlier = tree(finished)
    for script in ("eval.py", "sample.py", "compress.py"):
        result = run(script, tmp_path, f"ckpt_path={last}", f"hydra.run.dir={users_folder}/nope/..")
        one_line_refusal(result, "not this run's")
        result = run(script, tmp_path, f"ckpt_path={last}", f"hydra.run.dir={finished}/nope/..")
        one_line_refusal(result, "holds an earlier run")
    assert tree(users_folder) == before and tree(finished) == earlier
    # Through a link's `..`: Hydra writes where the path's text points (the link's folder), not the kernel.
    (tmp_path / "to_run").symlink_to(finished / "checkpoints")
    result = run("train.py", tmp_path, *TWO_EPOCHS, "model.lr=1e-3", f"hydra.run.dir={tmp_path}/to_run/..")
    one_line_refusal(result, f"hydra.run.dir={tmp_path} ")
    assert tree(finished) == earlier and tree(users_folder) == before


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, finished) -> Path:
    """A file of 2 test images, compressed with the finished run's checkpoint."""
    cwd = tmp_path_factory.mktemp("compressed")
    result = run("compress.py", cwd, f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}", "n_images=2")
    assert result.returncode == 0, result.stderr[-2000:]
    (file,) = (cwd / "logs" / "compress" / "runs").glob("*/images.vdvae")
    return file


def test_decompressing_into_a_users_folder_is_refused_and_keeps_their_images(
    tmp_path, users_folder, finished, compressed
):
    before = tree(users_folder)
    args = [f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}", "mode=decompress", f"file={compressed}"]
    result = run("compress.py", tmp_path, *args, f"hydra.run.dir={users_folder}")
    one_line_refusal(result, "not this run's")
    assert tree(users_folder) == before
    # Into an empty folder of the user's it writes, and the folder stays theirs (not removed on failure).
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("compress.py", tmp_path, *args, f"hydra.run.dir={empty}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (empty / "images").iterdir()) == ["00000.png", "00001.png"]


def test_a_second_run_into_a_fixed_folder_without_hydras_config_is_refused_not_resumed(tmp_path):
    fixed = [*TINY_RUN, "trainer.max_steps=2", "test=false", f"hydra.run.dir={tmp_path}/fixed"]
    fixed += ["hydra.output_subdir=null"]
    assert run("train.py", tmp_path, *fixed).returncode == 0
    last = (tmp_path / "fixed" / "checkpoints" / "last.ckpt").read_bytes()
    result = run("train.py", tmp_path, *fixed, "model.lr=1e-3")
    one_line_refusal(result, "not this run's")
    assert (tmp_path / "fixed" / "checkpoints" / "last.ckpt").read_bytes() == last


def test_a_sweep_needs_a_new_folder_and_a_folder_per_job(tmp_path, users_folder):
    sweep = ["-m", *TINY_RUN, "trainer.max_steps=2", "test=false", "model.lr=1e-3,2e-3"]
    result = run("train.py", tmp_path, *sweep, "hydra.sweep.subdir=.")
    one_line_refusal(result, "hydra.sweep.subdir=.", "the same folder")
    assert not (tmp_path / "logs").exists()
    before = tree(users_folder)
    result = run("train.py", tmp_path, *sweep, f"hydra.sweep.dir={users_folder}")
    one_line_refusal(result, "already exists", "new folder")
    assert tree(users_folder) == before
    # Ten million jobs are refused before Hydra lists them (minutes and gigabytes).
    result = run("train.py", tmp_path, "-m", *TINY_RUN, "model.lr=range(0,10000000)")
    one_line_refusal(result, "the sweep has 10,000,000 jobs")
    assert not (tmp_path / "logs").exists()


def test_a_run_folder_that_cannot_be_written_is_refused_before_hydra_writes(tmp_path, monkeypatch):
    # (Tests run as root, whom permissions do not stop: the check asks the system as a user's run would.)
    from vdvae.errors import ConfigError
    from vdvae.lifecycle import check_writable

    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(ConfigError, match=f"hydra.run.dir={tmp_path}/a/b cannot be written .{tmp_path} is read-only"):
        check_writable(tmp_path / "a" / "b", "hydra.run.dir")


def test_a_finished_run_resumes_and_tests_its_best_checkpoint(tmp_path, finished):
    # The run ended on an epoch's last step: last.ckpt must name the best checkpoint that exists.
    resumed = run("train.py", tmp_path, *TWO_EPOCHS, f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}", "test=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (best,) = (finished / "checkpoints").glob("best-*.ckpt")
    assert f"checkpoint {best}" in resumed.stdout + resumed.stderr
    assert "no longer exists" not in resumed.stdout + resumed.stderr


COUNTER_DAMAGE = [
    (lambda c: c.update(global_step=-40), "global_step=-40"),
    (lambda c: c["lr_schedulers"][0].update(last_epoch=-40), "learning-rate schedule's step -40"),
    (
        lambda c: c["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]["total"].update(
            completed=-40
        ),
        "not a count",
    ),
    (lambda c: [s.update(step=torch.tensor(-40.0)) for s in c["optimizer_states"][0]["state"].values()], "-40"),
]


def test_a_checkpoints_counters_are_checked_against_its_step_before_the_run(tmp_path, finished):
    from vdvae.resume import counter_mismatch

    for damage, named in COUNTER_DAMAGE:  # each counter a resume restores
        checkpoint = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
        assert counter_mismatch(checkpoint) == ""
        damage(checkpoint)
        assert named in counter_mismatch(checkpoint)
    # As typed: resuming the run from a last.ckpt whose step is -40 is refused and leaves the run as it was.
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    COUNTER_DAMAGE[0][0](checkpoint)
    torch.save(checkpoint, last)
    before = tree(run_dir)
    result = run("train.py", tmp_path, *TWO_EPOCHS, "trainer.max_steps=60", f"ckpt_path={last}")
    one_line_refusal(result, "step counters disagree", "global_step=-40")
    assert tree(run_dir) == before


def test_a_requeued_job_resumes_only_a_checkpoint_its_own_run_wrote(tmp_path, finished):
    # A SLURM job's folder is `slurm-<job id>`; its requeued self (same job id) resumes from last.ckpt there.
    env = {"SLURM_JOB_ID": "77"}
    first = run("train.py", tmp_path, *TINY_RUN, "trainer.max_steps=2", "test=false", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "logs" / "train" / "runs" / "slurm-77"
    requeued = run("train.py", tmp_path, *TINY_RUN, "trainer.max_steps=4", "test=false", env=env)
    assert requeued.returncode == 0 and "resuming from it" in requeued.stdout, requeued.stderr[-2000:]
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # A last.ckpt that another run wrote, put there: never resumed from, never replaced.
    shutil.copy(finished / "checkpoints" / "last.ckpt", folder / "checkpoints" / "last.ckpt")
    before = tree(folder)
    result = run("train.py", tmp_path, *TINY_RUN, "trainer.max_steps=60", "test=false", env=env)
    one_line_refusal(result, "was not written by this run")
    assert tree(folder) == before
    # Another SLURM job never writes into it.
    other = run("train.py", tmp_path, *TINY_RUN, f"hydra.run.dir={folder}", env={"SLURM_JOB_ID": "78"})
    one_line_refusal(other, "holds an earlier run")
    assert tree(folder) == before


def test_a_checkpoints_hyperparameters_are_checked_against_its_weights_before_a_model_is_built(tmp_path, finished):
    from vdvae.checkpoints import CheckpointError, module_from_checkpoint

    for change in ({"dec_blocks": "1x1," * 100_000 + "1x1"}, {"dec_blocks": "1x1,4m1,4x1,8m4,8x100000000"}):
        checkpoint = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
        checkpoint["hyper_parameters"]["vae"].update(change)
        with pytest.raises(CheckpointError, match="more than 10,000 blocks"):
            module_from_checkpoint(checkpoint, "crafted.ckpt")
    # As typed: a checkpoint of kilobytes saying width=4096 (a model of gigabytes) is refused on the meta device.
    checkpoint = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["vae"]["width"] = 4096
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    result = run("eval.py", tmp_path, f"ckpt_path={crafted}", timeout=60)  # sample.py and compress.py alike
    one_line_refusal(result, "its weights do not fit the model its hyperparameters describe")


# Option values that ended in tracebacks, inside training, or were accepted: each refused in one line, with
# nothing written, before the run folder exists. As typed, one of each command and of each way it is found
# (the config's check, the data's set-up, a sweeper's option); the other training options by the same check.
BAD_OPTIONS = [
    ("train.py", "model.betas=abc", "model.betas='abc' is not valid"),
    ("train.py", "data.test_size=5000", "data.test_size=5000 must be between 1 and 1796"),
    ("eval.py", "iw_samples=nan", "iw_samples=nan is not valid"),
    ("sample.py", "temperatures=[nan]", "temperatures=[nan] is not valid"),
    ("compress.py", "n_images=-1", "n_images=-1 is not valid"),
]
BAD_TRAINING_OPTIONS = [
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is not valid"),
    ("model.weight_decay=-1", "model.weight_decay=-1 is not valid"),
    ("model.weight_decay=inf", "model.weight_decay=inf is not valid"),
    ("model.eps=-1", "model.eps=-1 is not valid"),
    ("model.eps=0", "model.eps=0 is not valid"),
    ("model.lr_min=-1", "model.lr_min=-1 is not valid"),
    ("model.decay_steps=-1", "model.decay_steps=-1 is not valid"),
    ("model.vae.zdim=0", "model.vae.zdim=0 is not valid"),
    ("callbacks.image_grids.temperatures=[-1]", "each temperature must be a finite number >= 0"),
]


def test_bad_option_values_are_refused_in_one_line_before_the_run_folder_exists(tmp_path, finished):
    last = finished / "checkpoints" / "last.ckpt"
    for script, option, said in BAD_OPTIONS:
        args = [*TINY_RUN] if script == "train.py" else [f"ckpt_path={last}"]
        result = run(script, tmp_path, *args, option)
        one_line_refusal(result, said)
    result = run("train.py", tmp_path, "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=0", *TINY_RUN)
    one_line_refusal(result, "hydra.sweeper.n_trials=0 is not valid")
    assert all(run_dirs(tmp_path, task) == [] for task in ("train", "eval", "sample", "compress"))


@pytest.mark.parametrize("option, said", BAD_TRAINING_OPTIONS)
def test_bad_training_options_fail_the_check_that_runs_before_the_run_folder_exists(option, said):
    from tests.conftest import compose_config
    from vdvae.config import check_config

    with pytest.raises(ValueError, match=re.escape(said)):
        check_config(compose_config(*TINY_RUN, option, config_name="train"))


def test_ctrl_c_while_a_run_starts_ends_it_in_one_line_and_leaves_no_folder(tmp_path):
    proc = start("train.py", tmp_path, *TINY_RUN, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not run_dirs(tmp_path):  # Hydra made the folder: the run is starting
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]  # -2: ended by the signal, as its default does
    assert "Traceback" not in out + err and "stopped by Ctrl-C" in out + err, (out + err)[-2000:]
    assert run_dirs(tmp_path) == []


def test_a_compressed_file_of_noise_under_a_genuine_header_costs_one_chunk(tmp_path, finished, compressed):
    # 41,000 images declared over 41,000 words of noise (164 KB): it passes every check of its header.
    from vdvae.compression import read_compressed, read_file, write_file

    header, _ = read_file(read_compressed(compressed))
    n = 41_000
    header.update(count=n, chunks=[64] * (n // 64) + [n % 64], seed_words=1)
    header["chunks_sha256"] = ["0" * 64] * len(header["chunks"])
    noise = tmp_path / "noise.vdvae"
    noise.write_bytes(write_file(header, torch.randint(0, 2**31, (n,), dtype=torch.int64).numpy().astype("uint32")))
    args = [f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}", "mode=decompress", f"file={noise}"]
    result = run("compress.py", tmp_path, *args, timeout=120)
    one_line_refusal(result, f"chunk {len(header['chunks'])} of {len(header['chunks'])} decoded do not match")
    assert run_dirs(tmp_path, "compress") == []


def test_image_folders_that_would_hang_or_cost_more_than_they_hold_are_refused_as_typed(tmp_path):
    import zlib

    from PIL import Image

    from tests.fixtures import write_pngs

    folder = tmp_path / "pictures"
    write_pngs(folder, 8, 8)
    os.mkfifo(folder / "pipe.png")

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (20_000_000).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    wide = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(20_000_001), 9)) + chunk(b"IEND", b"")
    (folder / "wide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + wide)  # 19.5 KB: 1 x 20,000,000 pixels
    whole = (folder / "00000.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[:-20])
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    data = ["data=image_folder", f"data.root={folder}", "data.image_size=8", "data.channels=1", "data.val_size=2"]
    result = run("train.py", tmp_path, *[o for o in TINY_RUN if o != "data=digits"], *data, timeout=60)
    one_line_refusal(result, "4 of 12 image files cannot be read", "pipe.png (not a regular file")
    for said in ("wide.png (20000000x1 pixels", "truncated.png (truncated", "animated.png (animated, 2 frames"):
        assert said in result.stderr, result.stderr
    assert run_dirs(tmp_path) == []
