"""The package as `pip install .` gives it, used away from the repository: a wheel built from this tree,
installed into a directory of its own, whose commands run from another working directory with the
configs shipped inside it (and a user's own config directory on the search path)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.run_helpers import TINY_RUN

SMALL = [*TINY_RUN, "trainer.max_steps=2", "test=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this tree installed into its own directory (dependencies from the test environment)."""
    wheels, target = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True)
    (wheel,) = wheels.glob("vdvae-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    return target


def command(installed, name, cwd, *args, timeout=300):
    # PYTHONPATH first: the installed copy, not the repository's editable one, is imported.
    env = {**os.environ, "PYTHONPATH": str(installed), "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(installed / "bin" / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_ships_the_configs_and_the_commands(installed):
    assert (installed / "vdvae" / "conf" / "train.yaml").is_file()
    assert (installed / "vdvae" / "conf" / "model" / "cifar10.yaml").is_file()
    for name in ("vdvae-train", "vdvae-eval", "vdvae-sample", "vdvae-import"):
        assert (installed / "bin" / name).is_file(), name
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [sys.executable, "-c", "import vdvae; print(vdvae.__file__)"], env=env, capture_output=True, text=True
    )
    assert where.stdout.startswith(str(installed)), where.stdout  # the commands below run the installed copy


def test_installed_commands_train_sweep_evaluate_and_sample_from_any_directory(installed, tmp_path):
    result = command(installed, "vdvae-train", tmp_path, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

    sweep = command(installed, "vdvae-train", tmp_path, "-m", *SMALL, "seed=1,2", "hydra/launcher=local")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]

    scored = command(installed, "vdvae-eval", tmp_path, f"ckpt_path={last}", "logger=csv")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "test/bpd" in scored.stdout
    drawn = command(installed, "vdvae-sample", tmp_path, f"ckpt_path={last}", "n=4")
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert list((tmp_path / "logs" / "sample" / "runs").glob("*/samples_t*.png"))
    assert command(installed, "vdvae-import", tmp_path, "--help").returncode == 0


def test_a_users_own_config_directory_adds_presets(installed, tmp_path):
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mine.yaml").write_text("defaults:\n  - tiny\n  - _self_\nvae:\n  width: 12\n")
    small = [o for o in SMALL if o != "model=tiny"]
    result = command(installed, "vdvae-train", tmp_path, "--config-dir", "my_conf", "model=mine", *small)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert "width: 12" in (run_dir / ".hydra" / "config.yaml").read_text()
