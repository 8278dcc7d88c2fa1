"""The README's commands, run as written from a working directory of their own, with only the overrides
that make them small (a tiny model on digits, two updates): the sweeps make one run directory and one
W&B run per job, with the basic and the joblib launcher; a resume continues its run in place."""

import itertools
import re
import shlex

import pytest

from tests.conftest import ROOT
from tests.test_reliability import run, run_dirs

SMALL = [
    "model=tiny",
    "data=digits",
    "trainer=cpu",
    "trainer.max_steps=2",
    "test=false",
    "logger=wandb",
    "callbacks.image_grids.n_samples=4",
    "trainer.enable_progress_bar=false",
]


def readme_commands(prefix: str) -> list[list[str]]:
    """Every command in the README's indented code blocks that starts with `prefix`, comments removed."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    ")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))  # continuation lines
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.startswith(prefix)]


def jobs_of(args: list[str]) -> int:
    """How many jobs a sweep's comma-separated overrides make."""
    sizes = [len(a.split("=", 1)[1].split(",")) for a in args if "=" in a and "," in a and not a.startswith("hydra/")]
    return len(list(itertools.product(*[range(n) for n in sizes])))


SWEEPS = [
    c
    for c in readme_commands("python train.py -m")
    if "hydra/launcher=slurm" not in c and "hparams_search=optuna" not in c
]


def test_the_readme_has_the_sweeps_it_documents():
    assert len(SWEEPS) >= 2 and any("hydra/launcher=local" in c for c in SWEEPS)


@pytest.mark.parametrize("command", SWEEPS, ids=[" ".join(c[2:]) for c in SWEEPS])
def test_readme_sweep_as_typed_gives_one_run_dir_and_one_wandb_run_per_job(tmp_path, command):
    result = run("train.py", tmp_path, *command[2:], *SMALL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == jobs_of(command[2:]) >= 2
    runs = [list((job / "wandb").glob("offline-run-*")) for job in jobs]
    assert all(len(r) == 1 for r in runs) and len({r[0].name for r in runs}) == len(jobs)
    assert all((job / "checkpoints" / "last.ckpt").is_file() for job in jobs)


def test_readme_resume_continues_the_run_in_its_directory(tmp_path):
    (command,) = [c for c in readme_commands("python train.py ckpt_path=")]
    first = run("train.py", tmp_path, *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    ckpt = command[2].replace("<date>", run_dir.name)  # the README's relative path, from the working directory
    resumed = run("train.py", tmp_path, ckpt, *[o for o in SMALL if "max_steps" not in o], "trainer.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(tmp_path) == [run_dir]
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[-1] for p in wandb_runs}) == 1


def test_readme_optuna_search_runs_its_trials_and_reports_the_best(tmp_path):
    (command,) = [c for c in readme_commands("python train.py -m") if "hparams_search=optuna" in c]
    trials = [a if not a.startswith("hydra.sweeper.n_trials=") else "hydra.sweeper.n_trials=2" for a in command[2:]]
    small = [o for o in SMALL if "max_steps" not in o] + [
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "trainer.check_val_every_n_epoch=null",
        "logger=csv",
    ]
    result = run("train.py", tmp_path, *trials, *[o for o in small if o != "logger=wandb"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.lr" in results and "best_value" in results
