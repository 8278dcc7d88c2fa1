"""Run train.py's or sample.py's recipe in-process (composed with Hydra's compose API), or a command as a
user starts it (`python /path/to/<script> ...` in a working directory of its own, run directories chosen by
the framework), a check that a command's output holds no progress bar, and a callback that watches
last.ckpt."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import open_dict

from tests.conftest import ROOT, compose_config
from vdvae.tasks.train import train

# A tiny model on scikit-learn's digits: seconds per run.
TINY_RUN = [
    "model=tiny",
    "data=digits",
    "trainer=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.batch_size=50",
    "model.warmup_steps=5",
    "model.lr=3e-3",
    "model.ema_decay=0.9",
    "callbacks.image_grids.n_samples=4",
]


def job_config(out: Path, task: str, *overrides: str):
    """conf/<task>.yaml composed with `overrides` and the run directory `out`, set up as @hydra.main does."""
    cfg = compose_config(*overrides, f"hydra.run.dir={out}", config_name=task)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.name = task
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as under @hydra.main, the job's config has no hydra node
    out.mkdir(parents=True, exist_ok=True)
    return cfg


def run_in_process(out: Path, *overrides: str):
    """Compose train.yaml with `overrides`, with the run directory `out`, and run the recipe."""
    cfg = job_config(out, "train", *overrides)
    return train(cfg), cfg


def sample_in_process(out: Path, *overrides: str) -> list[Path]:
    """sample.py's recipe with `overrides`, writing into `out`: the paths it wrote."""
    from vdvae.tasks.sample import sample

    return sample(job_config(out, "sample", *overrides))


def shows_progress(output: str) -> bool:
    """Whether a command's captured output holds a progress bar (ours count img/s, Lightning's it/s)."""
    return "\r" in output or "img/s" in output or "it/s]" in output


def start(script: str, cwd: Path, *args: str, env=None, **kwargs) -> subprocess.Popen:
    """`python /path/to/<script> *args` started in a fresh interpreter in the working directory `cwd`, W&B
    offline (no server here)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, text=True, **kwargs)


def run(script: str, cwd: Path, *args: str, timeout=300, env=None) -> subprocess.CompletedProcess:
    """As `start`, to the end; its output captured."""
    proc = start(script, cwd, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def trained(cwd: Path, *args: str) -> Path:
    """`python train.py *args` run to its end in `cwd`: its run directory."""
    result = run("train.py", cwd, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(cwd)
    return run_dir


def run_dirs(cwd: Path, task: str = "train") -> list[Path]:
    """The run directories the commands of `task` (train, eval, sample) made under `cwd`, oldest first."""
    return sorted((cwd / "logs" / task / "runs").glob("*"))


class LastCheckpointProbe(Checkpoint):
    """After every training step: the step last.ckpt holds; raises at `fail_at` (a crash in training). A
    checkpoint callback, which Lightning runs last, after the last.ckpt callback that comes before it."""

    made = []  # the instances Hydra made, newest last

    def __init__(self, dirpath, fail_at=None):
        self.path, self.fail_at, self.saved = Path(dirpath) / "last.ckpt", fail_at, []
        LastCheckpointProbe.made.append(self)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        on_disk = torch.load(self.path, weights_only=True)["global_step"] if self.path.is_file() else None
        self.saved.append((trainer.global_step, on_disk))
        if trainer.global_step == self.fail_at:
            raise RuntimeError("a crash in training")
