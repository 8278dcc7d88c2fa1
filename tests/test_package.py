"""The package as `pip install .` gives it, used away from the repository: a wheel built from this tree,
installed into a fresh virtual environment (its dependencies seen from the test environment's
site-packages, so nothing is downloaded), whose commands run the README's commands from another
working directory with the configs shipped inside the package."""

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_readme import COMMANDS, User, readme_check

pytestmark = pytest.mark.slow  # subprocesses: a minute or more each module

# The README commands that take a different path when installed: the configs found in the package,
# run directories under the working directory, sweeps (basic and local parallel), resume, the user's own configs,
# and the importer's own config lookup. Evaluation, sampling and compression load their configs as
# training does: their commands are checked below through `--help`, which composes the config.
INSTALLED = [
    c
    for c in COMMANDS
    if c.startswith(("python train.py -m model.lr", "python train.py -m hydra/launcher=local", "vdvae-train"))
    or c.startswith(("python train.py ckpt_path=", "python import_original.py"))
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding a wheel of this tree; its dependencies come from the test environment."""
    wheels, env = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("venv")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True)
    (wheel,) = wheels.glob("vdvae-*.whl")
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    own_site = Path(subprocess.run([python, "-c", purelib], capture_output=True, text=True, check=True).stdout.strip())
    # The test environment's packages on the path, as plain directories: the dependencies, but not this
    # checkout (its editable install is a .pth there, which a path entry does not run).
    (own_site / "deps.pth").write_text("\n".join(site.getsitepackages()))
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], check=True)
    return env


def test_the_wheel_ships_the_configs_and_the_commands(installed, tmp_path):
    for name in ("vdvae-train", "vdvae-eval", "vdvae-sample", "vdvae-compress", "vdvae-import"):
        assert (installed / "bin" / name).is_file(), name
    code = "import vdvae.conf, importlib.resources as r; print(vdvae.__file__); print(r.files('vdvae.conf'))"
    code += "; import vdvae.tasks.eval, vdvae.tasks.sample, vdvae.tasks.compress"  # what the commands load
    where = subprocess.run(
        [installed / "bin" / "python", "-c", f"import vdvae; {code}"], cwd=tmp_path, capture_output=True, text=True
    )
    module, conf = where.stdout.split()
    assert module.startswith(str(installed)), module  # the commands run the installed copy, not the checkout
    assert ROOT / "src" not in Path(module).parents
    for config in (
        "train.yaml",
        "compress.yaml",
        "model/cifar10.yaml",
        "hydra/launcher/local.yaml",
        "hparams_search/optuna.yaml",
    ):
        assert os.path.isfile(os.path.join(conf, config)), config


def test_installed_commands_cover_the_readme():
    assert len(INSTALLED) == 5, INSTALLED


@pytest.mark.parametrize("name", ["eval", "sample", "compress"])
def test_the_other_commands_compose_their_configs_from_the_package(installed, tmp_path, name):
    result = subprocess.run(
        [installed / "bin" / f"vdvae-{name}", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"vdvae-{name} ({name}.py)") and "ckpt_path: ???" in result.stdout
    assert not (tmp_path / "logs").exists()  # help writes nothing


@pytest.fixture(scope="module")
def user(installed, tmp_path_factory) -> User:
    return User(tmp_path_factory.mktemp("user"), bin_dir=installed / "bin")


@pytest.mark.parametrize("command", INSTALLED)
def test_readme_command_runs_from_the_installed_package(user, command):
    readme_check(user, command)


def test_without_the_extras_the_plugins_load_quietly_and_a_choice_of_theirs_says_which_extra(monkeypatch, capsys):
    # A plain `pip install .`: no submitit launcher, no Optuna sweeper.
    import importlib

    from vdvae import cli

    for missing in ("hydra_plugins.hydra_submitit_launcher", "hydra_plugins.hydra_submitit_launcher.config"):
        monkeypatch.setitem(sys.modules, missing, None)  # importing it raises ImportError
    import hydra_plugins.vdvae_sweepers.slurm_launcher as slurm_launcher

    importlib.reload(slurm_launcher)  # Hydra's plugin scan imports it in every command: no error, no plugin
    from hydra.plugins.launcher import Launcher

    assert not issubclass(slurm_launcher.SlurmLauncher, Launcher)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    for choice, extra in (("hydra/launcher=slurm", "slurm"), ("hparams_search=optuna", "optuna")):
        with pytest.raises(SystemExit) as refused:
            cli.check_extras(["train.py", "-m", choice])
        error = capsys.readouterr().err
        assert refused.value.code == 1 and error.count("\n") == 1 and f"pip install '.[{extra}]'" in error
    monkeypatch.undo()
    importlib.reload(slurm_launcher)
