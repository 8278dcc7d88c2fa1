"""What the SLURM launcher asks for (conf/hydra/launcher/slurm.yaml), without a cluster: resources follow
the trainer (GPUs only for a GPU trainer), and each choice is one override that reaches the sbatch script
submitit writes (the jobs themselves: tests/test_slurm.py); a job stranded on nodes the partition lacks,
and a sweep that sbatch refuses, which ends in one line."""

import os

import pytest
import submitit
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from tests.conftest import compose_config


def launcher(*overrides: str) -> dict:
    cfg = compose_config("hydra/launcher=slurm", *overrides, config_name="train")
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.fixture
def srun(tmp_path, monkeypatch):
    """An `srun` on PATH, which submitit's SLURM executor looks for before it writes anything."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


def sbatch_script(tmp_path, *overrides: str) -> list[str]:
    """The #SBATCH lines submitit writes for the launcher's parameters (passed on as the launcher does:
    its generic options by name, the SLURM ones as slurm_<name>)."""
    params = launcher(*overrides)
    init = {"submitit_folder", "max_num_timeout", "_target_"}
    generic = set(submitit.AutoExecutor._valid_parameters()) | {"name", "stderr_to_stdout"}
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items() if k not in init})
    text = executor._executor._make_submission_file_text("python -m job", "0")
    return [line for line in text.splitlines() if line.startswith("#SBATCH") or line.startswith("export")]


@pytest.mark.parametrize(
    "trainer, expected",
    [
        (["trainer=cpu"], (1, 1, None, 1, 4)),
        (["trainer=ddp"], (1, 2, None, 1, 8)),  # 2 processes on the CPU: 2 tasks
        (["trainer=default"], (1, 1, None, 1, 4)),  # accelerator auto: no GPU asked for
        (["trainer=gpu"], (1, 1, 1, 8, 64)),
        (["trainer=gpu", "trainer.devices=[0,1]"], (1, 2, 2, 8, 64)),
        (["trainer=multi_node", "trainer.num_nodes=4", "trainer.devices=8"], (4, 8, 8, 8, 64)),
    ],
    ids=["cpu", "ddp", "auto", "gpu", "gpu-list", "multi-node"],
)
def test_resources_follow_the_trainer_and_gpus_only_for_a_gpu_trainer(trainer, expected):
    p = launcher(*trainer)
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["cpus_per_task"], p["mem_gb"]) == expected


def test_a_gpu_trainer_without_a_device_count_is_refused_by_name():
    with pytest.raises(
        InterpolationResolutionError, match=r"trainer.devices='auto' with trainer.accelerator=gpu: .*trainer.devices=4"
    ):
        launcher("trainer=gpu", "trainer.devices=auto")


def test_each_resource_choice_is_one_override_that_reaches_sbatch(tmp_path, srun):
    cpu = sbatch_script(tmp_path, "trainer=cpu")
    assert "#SBATCH --cpus-per-task=1" in cpu and "#SBATCH --mem=4GB" in cpu
    assert not [line for line in cpu if "gpu" in line or "gres" in line]  # a CPU partition takes it
    assert "export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK > 0 ? SLURM_CPUS_PER_TASK : 1 ))" in cpu
    gpu = sbatch_script(tmp_path, "trainer=multi_node", "trainer.num_nodes=4", "trainer.devices=8")
    assert {"#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8"} <= set(gpu)
    choices = {
        "partition=debug": "#SBATCH --partition=debug",
        "timeout_min=30": "#SBATCH --time=30",
        "cpus_per_task=3": "#SBATCH --cpus-per-task=3",
        "mem_gb=7": "#SBATCH --mem=7GB",
        "gpus_per_node=null": None,
        "account=lab": "#SBATCH --account=lab",
        "qos=high": "#SBATCH --qos=high",
        "constraint=a100": "#SBATCH --constraint=a100",
    }
    for choice, line in choices.items():
        lines = sbatch_script(tmp_path, "trainer=gpu", f"hydra.launcher.{choice}")
        if line is None:
            assert not [x for x in lines if "gpus" in x], choice
        else:
            assert line in lines, (choice, lines)


def fake(tmp_path, name: str, script: str):
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / name).write_text("#!/bin/sh\n" + script)
    (tmp_path / "bin" / name).chmod(0o755)


def test_a_job_requeued_onto_nodes_the_partition_lacks_is_stranded_and_only_that(tmp_path, monkeypatch):
    from vdvae.slurm import stranded

    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    lacking = "Reason=Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions"
    fake(tmp_path, "sinfo", "echo '1 idle'; echo '1 down*'\n")  # one of the partition's two nodes is down
    for state, restarts, reason, expected in [
        ("PENDING", 1, lacking, "Nodes required for job are DOWN, DRAINED or reserved"),
        ("PENDING", 1, "Reason=ReqNodeNotAvail,_UnavailableNodes:node2", "ReqNodeNotAvail, UnavailableNodes:node2"),
        ("PENDING", 0, lacking, None),  # never ran: it waits as any new job does
        ("PENDING", 2, "Reason=Resources", None),  # waits for busy nodes, which come free
        ("RUNNING", 1, "Reason=None", None),
        ("PENDING", 1, "Reason=ReqNodeNotAvail,_Reserved_for_maintenance", None),  # comes back
    ]:
        shown = f"JobId=13 JobState={state} {reason} Restarts={restarts} Partition=debug NumNodes=2"
        fake(tmp_path, "scontrol", f"echo '{shown}'\n")
        found = stranded("13")
        assert (found is None) if expected is None else found.startswith(expected), (state, restarts, reason, found)
    fake(tmp_path, "sinfo", "echo '2 mixed'\n")  # both up: it runs when they are free
    assert stranded("13") is None


def test_a_sweep_slurm_does_not_take_ends_in_one_line(tmp_path, srun):
    from tests.run_helpers import run

    fake(
        tmp_path,
        "sbatch",
        "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\nexit 1\n",
    )
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = run(
        "train.py", tmp_path, "-m", "hydra/launcher=slurm", "hydra.launcher.partition=nope", "model=tiny", env=env
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "Error: hydra/launcher=slurm: SLURM did not take the jobs: " in result.stderr
    assert "Invalid partition name specified" in result.stderr.strip().splitlines()[-1]
