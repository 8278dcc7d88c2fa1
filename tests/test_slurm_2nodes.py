"""Multi-node training on a real cluster of two nodes: node1 and node2, each a network namespace of this
machine with an address and a slurmd of its own (`scripts/slurm-cluster start --nodes 2`, started by the
`cluster` fixture and stopped again if it started it; skipped where it cannot start, except under CI=true,
where that fails). Each node has 1 CPU: the jobs, 1 task a node, run one at a time.

Commands run as a user types them, each from a working directory of its own. Who writes what is seen by
Python's audit hooks (tests/write_audit/sitecustomize.py, on the jobs' PYTHONPATH)."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.run_helpers import run, run_dirs
from tests.test_reliability import RUN, assert_same_state, load, wait_for_step
from tests.test_slurm import (
    CLUSTER,
    ENV,
    PROBES,
    cancel,
    job_ids,
    job_log,
    mid_run,
    output,
    readme_slurm_line,
    scores_of,
    slow,
    slurm_cluster,
    submit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1"]
# 40 updates, last.ckpt every 2, validation every 10.
LONG = [*RUN, "trainer.max_steps=40", "trainer.val_check_interval=10"]
AUDITED = {**PROBES, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'write_audit'}"}


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The 2-node cluster."""
    yield from slurm_cluster("--nodes", "2")


def nodes_of(job: str) -> tuple[str, str]:
    """How many nodes SLURM gave the job, and which (sacct)."""
    shown = ["sacct", "-n", "-X", "-P", "-j", job, "-o", "NNodes,NodeList"]
    shown = subprocess.run(shown, capture_output=True, text=True)
    return tuple(shown.stdout.strip().splitlines()[-1].split("|"))


def the_sweep(cwd: Path, task="train") -> Path:
    (sweep,) = (cwd / "logs" / task / "multiruns").iterdir()
    return sweep


def the_sweep_of(cwd: Path, proc: subprocess.Popen) -> Path:
    """The sweep folder of `proc`, once it made one."""
    for _ in range(600):
        folders = list((cwd / "logs" / "train" / "multiruns").glob("*/0"))
        if folders or proc.poll() is not None:
            break
        time.sleep(0.2)
    return the_sweep(cwd)


def test_the_readme_multi_node_line_runs_each_job_on_two_nodes(tmp_path):
    # As typed, with only the cluster's partition, its nodes, the CPU and the tiny model (and its short run).
    fitted = ["hydra.launcher.partition=debug", "trainer.num_nodes=2", "trainer.devices=1"]
    sweep = readme_slurm_line(tmp_path, *fitted, "trainer.accelerator=cpu", "trainer.precision=32-true")
    for job, slurm_id in zip(("0", "1"), job_ids(sweep), strict=True):
        assert nodes_of(slurm_id) == ("2", "node[1-2]")
        assert len(list((sweep / job / "checkpoints").glob("*.ckpt"))) == 2  # last and best: one each
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in job_log(sweep / job)
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (sweep / job / "train_rank1.log").read_text()


@pytest.fixture(scope="module")
def local_ddp(tmp_path_factory):
    """LONG as `trainer=ddp` on this machine (2 processes, gloo), tested: what the 2-node jobs must equal."""
    cwd = tmp_path_factory.mktemp("local_ddp")
    result = run("train.py", cwd, *LONG, "trainer=ddp", "test=true", env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(cwd)
    return run_dir


def writes(audit: Path) -> list[tuple[str, str, str]]:
    """(who, event, path) of every write the audited processes made."""
    return [tuple(line.split(" ", 2)) for file in audit.glob("*.txt") for line in file.read_text().splitlines()]


def test_a_2_node_job_equals_the_local_ddp_run_and_one_process_writes_its_folder(tmp_path, local_ddp):
    audit = tmp_path / "audit"
    audit.mkdir()
    env = {**AUDITED, "VDVAE_WRITE_AUDIT": str(audit)}
    (tmp_path / "job").mkdir()
    began = time.time()
    probe = ["+callbacks.probe._target_=tests.ddp_probe.RankProbe", f"+callbacks.probe.dirpath={tmp_path / 'probe'}"]
    job = submit(tmp_path / "job", *LONG, *TWO_NODES, "test=true", "logger=many", *probe, env=env)
    try:
        out, err = job.communicate(timeout=400)
    finally:
        job.kill()
        cancel(tmp_path / "job")
    print(f"2-node job: {time.time() - began:.0f} s")
    assert job.returncode == 0, err[-3000:]
    sweep = the_sweep(tmp_path / "job")
    (slurm_id,) = job_ids(sweep)
    assert nodes_of(slurm_id) == ("2", "node[1-2]")
    run_dir = sweep / "0"
    # Bit for bit: weights, EMA, optimizer moments, schedule, step; and the test set's metrics.
    assert_same_state(load(local_ddp / "checkpoints" / "last.ckpt"), load(run_dir / "checkpoints" / "last.ckpt"))
    assert scores_of(run_dir) == scores_of(local_ddp) and scores_of(run_dir)["test/n_images"] == "297.0"
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert sorted(r["test_images_seen"] for r in ranks) == [148, 149]  # each test image once, on one node
    # One writer: rank 0 writes everything in the run folder but rank 1's own log.
    seen = [(who, path) for who, _, path in writes(audit) if path.startswith(str(run_dir) + os.sep)]
    by_rank1 = {path for who, path in seen if who == "rank1"}
    assert by_rank1 == {str(run_dir / "train_rank1.log")}, by_rank1
    assert {who for who, _ in seen} == {"rank0", "rank1"}
    by_rank0 = {Path(path).relative_to(run_dir).parts[0] for who, path in seen if who == "rank0"}
    assert {"train.log", "job.json", "checkpoints", "images", "csv", "tensorboard", "wandb"} <= by_rank0, by_rank0
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    log = job_log(run_dir)  # rank 0's log alone: one test table, no line of rank 1's
    assert log.count("test metrics") == 1 and "GLOBAL_RANK: 1" not in log and "[rank: 1]" not in log


def test_scontrol_requeue_of_a_2_node_job_resumes_on_both_nodes_and_ends_as_the_straight_run(tmp_path, local_ddp):
    proc = submit(tmp_path, *LONG, *TWO_NODES, *slow(0.15, tmp_path / "starts"))
    sweep, last, job, before, requeued, out, err = mid_run(tmp_path, proc, 10, ["scontrol", "requeue"], timeout=300)
    print(f"requeued 2-node job finished {time.time() - requeued:.0f} s after `scontrol requeue`")
    assert proc.returncode == 0, (out + err)[-3000:]
    log = job_log(sweep / "0")
    stopped = [int(s) for s in re.findall(r"stopped at step (\d+): saved", log)]
    starts = (tmp_path / "starts").read_text().split()
    assert starts[:2] == ["0", "0"] and len(starts) == 4  # from scratch once, then resumed once
    assert int(starts[2]) == stopped[0] >= before and starts[3] == "1"  # from what SIGTERM saved
    assert "resuming from it" in log and "SLURM_RESTART_COUNT=1" in log
    assert "SLURM_RESTART_COUNT=1" in (sweep / "0" / "train_rank1.log").read_text()  # both nodes came back
    assert nodes_of(job) == ("2", "node[1-2]")
    assert_same_state(load(local_ddp / "checkpoints" / "last.ckpt"), load(last))


def node2_dies():
    """node2 fails as a machine does: its link goes down first (nothing it sends arrives: no rank hears its
    connections close), then its slurmd and every process in its namespace get SIGKILL."""
    subprocess.run(["ip", "link", "set", "vdvae-n2h", "down"], check=True)
    namespace = f"net:[{os.stat('/run/netns/vdvae-node2').st_ino}]"
    inside = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "ns" / "net") == namespace:
                inside.append(int(proc.name))
        except OSError:
            pass
    assert inside
    for pid in inside:
        os.kill(pid, signal.SIGKILL)


def node2_returns():
    subprocess.run(["ip", "link", "set", "vdvae-n2h", "up"], check=True)
    subprocess.run([*CLUSTER, "start", "--nodes", "2"], check=True, capture_output=True, timeout=300)


def test_a_lost_node_ends_the_job_in_bounded_time_and_its_resume_runs_on_both_nodes(tmp_path):
    # The collective timeout (trainer.strategy.timeout_s) ends rank 0's wait for the dead rank; SLURM finds
    # node2 down (after its SlurmdTimeout, 20 s here) and requeues the job, which cannot run on one node:
    # the launcher cancels it after STRANDED_S (30 s) and records it as crashed, with the command that
    # resumes it on the cluster.
    proc = submit(tmp_path, *LONG, *TWO_NODES, "trainer.strategy.timeout_s=10", *slow(0.2, tmp_path / "starts"))
    try:
        sweep = the_sweep_of(tmp_path, proc)
        last = sweep / "0" / "checkpoints" / "last.ckpt"
        wait_for_step(last, 6, proc, timeout=300)
        node2_dies()
        died = time.time()
        out, err = proc.communicate(timeout=300)
        ended = time.time() - died
    finally:
        proc.kill()
        node2_returns()
    print(f"sweep ended {ended:.0f} s after node2 died")
    assert proc.returncode == 1 and "Traceback" not in err, (out + err)[-3000:]
    log = job_log(sweep / "0")
    # rank 0 gave up on the dead rank (gloo's words depend on where it waited: "Application timeout caused
    # pair closure", "Timed out waiting 10000ms for recv operation")
    assert re.search(r"RuntimeError at step \d+ in one of 2 processes: not saved", log)
    assert re.search(r"(?i)time(d)? ?out", log.split("RuntimeError at step")[1])
    assert ended < 10 + 20 + 30 + 60
    (row,) = csv.DictReader((sweep / "summary.csv").open())
    assert row["status"] == "crashed" and "was requeued (a node failed)" in row["error"], row
    told = re.search(r"resume it: (python train\.py .*?)(;|$)", row["error"])
    command = shlex.split(told.group(1))
    assert command[2:4] == ["-m", "hydra/launcher=slurm"] and command[-1] == f"ckpt_path={last}"
    # The told command, on both nodes again: the job resumes from last.ckpt (4 more steps, to be quick).
    step = load(last)["global_step"]
    began = time.time()
    resumed = run("train.py", tmp_path, *command[2:], f"trainer.max_steps={step + 4}", env=PROBES, timeout=300)
    print(f"resumed job: {time.time() - began:.0f} s")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    (again,) = [p for p in sweep.parent.iterdir() if p != sweep]
    (job,) = job_ids(again)
    assert nodes_of(job) == ("2", "node[1-2]")
    assert "Restoring states from the checkpoint" in job_log(again / "0")
    assert load(again / "0" / "checkpoints" / "last.ckpt")["global_step"] == step + 4


def on_node(name: str, *command: str, cwd: Path, env: dict) -> subprocess.Popen:
    """`command` started on node `name` as a process of that machine: in its network namespace, under its
    host name."""
    inner = f"hostname {name} && exec {shlex.join(command)}"
    wrapped = ["nsenter", f"--net=/run/netns/vdvae-{name}", "unshare", "--uts", "sh", "-c", inner]
    return subprocess.Popen(wrapped, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_across_the_two_nodes_is_one_run_that_equals_the_local_ddp_run(tmp_path, local_ddp):
    # As docs/training.md gives it: one torchrun a node, meeting at node1's rendezvous, the run named by its id.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node1:29400", "--rdzv-id", "digits-2nodes"]
    command = [*torchrun, str(ROOT / "train.py"), *LONG, *TWO_NODES, "test=true"]
    env = {**os.environ, **ENV}
    began = time.time()
    nodes = [on_node(name, *command, cwd=tmp_path, env=env) for name in ("node1", "node2")]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    print(f"torchrun on 2 nodes: {time.time() - began:.0f} s")
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out + err for out, err in outputs)[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name == "torchrun-digits-2nodes"
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in job_log(run_dir)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_rank1.log").read_text()
    assert_same_state(load(local_ddp / "checkpoints" / "last.ckpt"), load(run_dir / "checkpoints" / "last.ckpt"))
    assert scores_of(run_dir) == scores_of(local_ddp)
