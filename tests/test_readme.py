"""Every command in the README, run as written from a working directory of its own (the data where the
configs look for it, under `data/`), with only the overrides that make it small: fewer steps and images,
narrow models, fewer samples. Never a hand-set run or sweep directory. A command the README gains
without a recipe here fails `test_every_readme_command_has_a_recipe`."""

import functools
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import fixtures
from tests.conftest import DATA, ROOT

pytestmark = pytest.mark.slow  # subprocesses: a minute or more each module

PROGRAMS = ("make", "python", "vdvae-train", "vdvae-eval", "vdvae-sample", "vdvae-compress", "vdvae-import")
PROGRAMS += ("vdvae-dashboard",)
SCRIPTS = {
    "train.py": "vdvae-train",
    "eval.py": "vdvae-eval",
    "sample.py": "vdvae-sample",
    "compress.py": "vdvae-compress",
    "import_original.py": "vdvae-import",
}

# Smaller data and models; a validation at step 2 (so sweeps have a metric to report).
SMALL_DATA = ["data.val_size=4", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0"]
SMALL_MODEL = ["model.vae.width=8", "callbacks.image_grids.n_samples=2", "callbacks.image_grids.n_recon=2"]
SMALL_RUN = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null"]
SMALL_RUN += ["trainer.log_every_n_steps=1"]  # (2 steps: every W&B panel gets its data)
SMALL_TRAIN = [*SMALL_DATA, *SMALL_MODEL, *SMALL_RUN, "trainer.enable_progress_bar=false"]
SMALL_SAMPLE = ["n=2", "n_images=2", "steps=3"]
REFERENCE = json.loads((DATA / "expected.json").read_text())["models"]["tiny"]  # original-format weights


def readme_commands() -> list[str]:
    """Every line of the README's indented code blocks that runs a program, continuation lines joined."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    ")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [line for line in joined.splitlines() if line.split(" ", 1)[0] in PROGRAMS]


def readme_python_block() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return block


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def jobs_of(args: list[str]) -> int:
    """How many jobs a basic sweep's comma-separated overrides make."""
    sizes = [len(a.split("=", 1)[1].split(",")) for a in args if "=" in a and "," in a and not a.startswith("hydra/")]
    return len(list(itertools.product(*[range(n) for n in sizes])))


class User:
    """A user's working directory (the data each command reads in `data/<name>`, the configs' default
    roots; two images and the original code's weights files the README names; a config directory) and
    how they start the commands: from a checkout (`bin_dir=None`), or an installed package's `bin/`,
    where `python train.py` is `vdvae-train`."""

    def __init__(self, cwd: Path, bin_dir: Path | None = None):
        self.cwd, self.bin_dir = cwd, bin_dir
        fixtures.make_mnist(cwd / "data" / "fashion_mnist", n_train=40, n_test=8)
        fixtures.make_mnist(cwd / "data" / "mnist", n_train=40, n_test=8)
        fixtures.make_cifar10(cwd / "data" / "cifar10")
        fixtures.make_imagenet(cwd / "data" / "imagenet64", "npy", size=64, n_train=12, n_test=4)
        for name in ("a.png", "b.png"):
            fixtures.write_pngs(cwd / "inputs", 1, 28, seed=len(name))
            (cwd / "inputs" / "00000.png").rename(cwd / name)
        shutil.copy(DATA / REFERENCE["file"], cwd / "cifar10-model.th")
        shutil.copy(DATA / REFERENCE["file"], cwd / "cifar10-model-ema.th")
        (cwd / "my_conf" / "model").mkdir(parents=True)
        (cwd / "my_conf" / "model" / "my_model.yaml").write_text(
            "defaults:\n  - cifar10\n  - _self_\nvae:\n  zdim: 8\n"
        )

    def program(self, command: list[str], env: dict) -> list[str]:
        """How `command` starts here: `python <script> ...` or `vdvae-<name> ...`, both run by the
        interpreter of the checkout or of the installed package, and `make` as itself."""
        if self.bin_dir is not None:  # the installed commands, run by the installed interpreter
            script, args = (SCRIPTS[command[1]], command[2:]) if command[0] == "python" else (command[0], command[1:])
            return [str(self.bin_dir / "python"), str(self.bin_dir / script), *args]
        if command[0] == "python":
            return [sys.executable, str(ROOT / command[1]), *command[2:]]
        if command[0].startswith("vdvae-"):
            return [sys.executable, str(Path(sys.executable).parent / command[0]), *command[1:]]
        return command

    def run(self, command: list[str], *extra: str, timeout=600) -> subprocess.CompletedProcess:
        """`command` (README words) plus `extra` overrides, W&B offline (no server here)."""
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
        args = self.program([*command, *extra], env)
        result = subprocess.run(args, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-4000:]}"
        return result

    def runs(self, task="train", kind="runs") -> set[Path]:
        return {p for p in (self.cwd / "logs" / task / kind).glob("*") if p.is_dir()}

    def train(self, command: list[str], task="train", kind="runs", small=SMALL_TRAIN) -> list[Path]:
        """Run a training command; the run directories it made."""
        before = self.runs(task, kind)
        self.run(command, *small)
        return sorted(self.runs(task, kind) - before)

    @functools.cached_property
    def quickstart(self) -> Path:
        """`make train`'s run: train.py with no arguments (the quick start), made small."""
        (run_dir,) = self.train(["python", "train.py"])
        return run_dir

    @property
    def last_ckpt(self) -> str:
        """The quick start's last.ckpt, relative to the working directory as in the README."""
        return str((self.quickstart / "checkpoints" / "last.ckpt").relative_to(self.cwd))

    @functools.cached_property
    def encoded(self) -> Path:
        """The latents file of the README's encode command."""
        (command,) = [c for c in readme_commands() if "mode=encode" in c]
        before = self.runs("sample")
        self.run(words(command.replace("...", self.last_ckpt)), *SMALL_SAMPLE)
        (out,) = self.runs("sample") - before
        return out / "latents.pt"

    @functools.cached_property
    def compressed(self) -> Path:
        """The file of the README's compress command (all 8 test images)."""
        (command,) = [c for c in readme_commands() if c.startswith("python compress.py") and "mode=" not in c]
        before = self.runs("compress")
        self.run(words(command.replace("logs/train/runs/<date>/checkpoints/last.ckpt", self.last_ckpt)))
        (out,) = self.runs("compress") - before
        return out / "images.vdvae"


def assert_run(run_dir: Path, wandb=True):
    """A finished run: its last state saved, its config kept, one offline W&B run."""
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.log").stat().st_size > 0
    if wandb:
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


# Each README command: how it is checked. Keys are what the command starts with.
def check_make(user, command):
    target = command[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    dry = ["make", "-n", "--no-print-directory", target]
    dry = subprocess.run(dry, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    last = dry.strip().splitlines()[-1]
    if target == "test":  # this test suite is that command's run
        assert " -m pytest " in last, last
        return
    assert last.endswith("/python train.py"), last  # what `make train` runs after set-up: the quick start
    assert_run(user.quickstart)
    assert (user.quickstart / ".hydra" / "overrides.yaml").read_text().count("\n- ") == len(SMALL_TRAIN) - 1


def check_train(user, command):
    args = command[2:] if command[0] == "python" else command[1:]
    if any(a.startswith("ckpt_path=") for a in args):  # resume, in place
        last = user.quickstart / "checkpoints" / "last.ckpt"
        step = torch.load(last, weights_only=True)["global_step"]
        command = [w.replace("logs/train/runs/<date>/checkpoints/last.ckpt", user.last_ckpt) for w in command]
        # As typed, with only a longer run: the run's own overrides (the small model and data) come from its checkpoint.
        assert user.train(command, small=[f"trainer.max_steps={step + 2}"]) == []  # no new run directory
        assert torch.load(last, weights_only=True)["global_step"] == step + 2
        wandb_runs = list((user.quickstart / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[-1] for p in wandb_runs}) == 1  # one W&B run id
        return
    if "hydra/launcher=slurm" in args:  # the job's config as SLURM gets it (its run on a cluster: test_slurm.py)
        check_slurm_config(args)
        return
    experiment = next((a.split("=")[1] for a in args if a.startswith("experiment=")), None)
    task = "debug" if any(a.startswith("debug=") for a in args) else experiment or "train"
    small = SMALL_DATA if task == "debug" else SMALL_TRAIN  # a debug preset is small already
    if "hparams_search=optuna" in args:
        small = [*small, "logger=csv"]
        command = [a if not a.startswith("hydra.sweeper.n_trials=") else "hydra.sweeper.n_trials=2" for a in command]
    if "-m" in args:
        (sweep,) = user.train(command, task, "multiruns", small)
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
        assert "completed" in (sweep / "summary.md").read_text()  # the sweep's table
        assert len(jobs) == (2 if "hparams_search=optuna" in args else jobs_of(args)) >= 2
        for job in jobs:
            assert_run(job, wandb="logger=csv" not in small)
        if "hparams_search=optuna" in args:
            assert "best_value" in (sweep / "optimization_results.yaml").read_text()
        else:
            ids = {p.name for job in jobs for p in (job / "wandb").glob("offline-run-*")}
            assert len(ids) == len(jobs)
        return
    (run_dir,) = user.train(command, task, "runs", small)
    assert_run(run_dir, wandb=task != "debug")  # Lightning's fast_dev_run logs nothing


def check_slurm_config(args: list[str]):
    from tests.conftest import compose_config

    first_values = [a.split(",")[0] for a in args if a != "-m"]
    cfg = compose_config(*first_values, config_name="train")
    launcher, trainer = cfg.hydra.launcher, cfg.trainer
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)
    assert (trainer.num_nodes, trainer.devices, cfg.data.image_size) == (4, 8, 32)


def check_eval(user, command):
    command = [w.replace("logs/train/runs/<date>/checkpoints/last.ckpt", user.last_ckpt) for w in command]
    before = user.runs("eval")
    user.run(command, "iw_samples=4")
    (out,) = user.runs("eval") - before
    figures = json.loads((out / "eval.json").read_text())["metrics"]
    assert figures["test/n_images"] == 8 and figures["test/iw_bpd"] > 0


def check_sample(user, command):
    text = shlex.join(command).replace("...", user.last_ckpt)
    text = text.replace("logs/sample/runs/<date>/latents.pt", str(user.encoded.relative_to(user.cwd)))
    if "mode=encode" in text:  # user.encoded ran it
        assert torch.load(user.encoded, weights_only=True)["latents"][0].shape[0] == 2
        return
    before = user.runs("sample")
    user.run(words(text), *SMALL_SAMPLE)
    (out,) = user.runs("sample") - before
    mode = text.split("mode=")[1].split()[0]
    expected = {"reconstruct": ["reconstructions"], "interpolate": ["interpolations"], "decode": ["decoded"]}
    expected["overview"] = ["overview"]
    expected["samples"] = ["samples_t1", "samples_t0.8", "samples_t0.5", "samples_t0"]
    for name in expected[mode]:
        assert (out / f"{name}.png").stat().st_size > 100, name


def check_compress(user, command):
    text = shlex.join(command).replace("...", user.last_ckpt)
    text = text.replace("logs/train/runs/<date>/checkpoints/last.ckpt", user.last_ckpt)
    text = text.replace("logs/compress/runs/<date>/images.vdvae", str(user.compressed.relative_to(user.cwd)))
    if "mode=decompress" not in text:  # user.compressed ran it
        report = json.loads((user.compressed.parent / "report.json").read_text())
        assert report["images"] == 8 and report["net_bits_per_dim"] > 0
        return
    before = user.runs("compress")
    user.run(words(text))
    (out,) = user.runs("compress") - before
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(8)]


def check_import(user, command):
    from tests.test_eval_sample import reference_overrides

    user.run(command, *reference_overrides(REFERENCE))
    out = command[command.index("--out") + 1]
    assert torch.load(user.cwd / out, weights_only=True)["state_dict"]


def check_dashboard(user, command):
    if "--check" in command:  # the quick start's run logs every key the panels name
        command = [w.replace("logs/train/runs/<date>", str(user.quickstart.relative_to(user.cwd))) for w in command]
        assert user.run(command).stdout.endswith("every panel's key is logged\n")
        return
    # Saving needs a W&B account; without one (as here), one line that says how to get one.
    env = {**os.environ, "HOME": str(user.cwd), "WANDB_API_KEY": ""}
    result = subprocess.run(user.program(command, env), cwd=user.cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "wandb login" in result.stderr, result.stderr


CHECKS = {"make": check_make, "train.py": check_train, "vdvae-train": check_train, "eval.py": check_eval}
CHECKS.update({"sample.py": check_sample, "compress.py": check_compress, "import_original.py": check_import})
CHECKS["vdvae-dashboard"] = check_dashboard
COMMANDS = readme_commands()


def check_of(command: list[str]):
    return CHECKS.get(command[1] if command[0] == "python" else command[0])


def readme_check(user: User, command: str):
    """Run the README's `command` as `user`, made small, and check what it made."""
    check_of(words(command))(user, words(command))


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> User:
    return User(tmp_path_factory.mktemp("user"))


def test_every_readme_command_has_a_recipe():
    assert len(COMMANDS) >= 20
    assert [c for c in COMMANDS if check_of(words(c)) is None] == []


def command_id(command: str) -> str:
    return re.sub(r"[^\w=.,/-]+", " ", command.split("#")[0]).strip()


@pytest.mark.parametrize("command", COMMANDS, ids=[command_id(c) for c in COMMANDS])
def test_readme_command_runs_as_written(user, command):
    readme_check(user, command)


def test_readme_python_example_runs_from_any_directory(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_python_block())
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
