"""The benchmark runs end to end on the tiny preset (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from vdvae import bench
from vdvae.model import VAE

CHANGED = "bf16-cl+batch=2+model.vae.activation=silu"  # SiLU and GELU: one operator each way


def test_configs_carry_a_batch_size_and_model_overrides():
    assert bench.parse_config(CHANGED) == ("bf16-cl", 2, ["model.vae.activation=silu"])
    assert bench.parse_config("fp32-ckpt+batch=3") == ("fp32-ckpt", 3, [])
    assert bench.parse_config("bf16-cl") == ("bf16-cl", None, [])
    with pytest.raises(ValueError, match="unknown config 'fp16'"):
        bench.parse_config("fp16+batch=2")
    with pytest.raises(ValueError, match="'batch=0' is neither batch=N nor a model.KEY=VALUE override"):
        bench.parse_config("fp32+batch=0")


@pytest.mark.slow
def test_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--preset",
            "tiny",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--configs",
            "fp32",
            CHANGED,
            "--steps",
            "2",
            "--warmup",
            "1",
            "--allocated-memory",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    hparams = bench.model_hparams("tiny")
    model = VAE(**hparams["vae"])
    n_params = sum(p.numel() for p in model.parameters())
    assert set(report["results"]) == {"fp32", CHANGED}
    assert report["results"][CHANGED]["batch"] == 2 and report["results"]["fp32"]["batch"] == 4
    for result in report["results"].values():
        for key in (
            "train_images_per_s",
            "eval_images_per_s",
            "sample_images_per_s",
            "peak_memory_mb",
            "gflop_per_image_train",
            "fraction_of_peak",
            "speedup_vs_fp32",
            "aten_ops_per_forward_backward",
        ):
            assert result[key] > 0 or key == "peak_memory_mb", key
        assert result["gflop_per_image_train"] > 2 * result["gflop_per_image_forward"]
        assert result["skipped"] == 0
        # Live tensors at the peak hold at least the weights, gradients, both Adam moments and the EMA.
        assert result["allocated_peak_mb"] * 2**20 >= 5 * 4 * n_params
    # Autocast adds casts: every convolution's weight and bias, and their gradients back to float32.
    results = report["results"]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert results[CHANGED]["aten_ops_per_forward_backward"] >= (
        results["fp32"]["aten_ops_per_forward_backward"] + 4 * n_convs
    )


def test_op_counter_counts_operators_but_not_views():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    with bench.OpCounter() as ops:
        y = (a + b).view(-1).t()  # one addition, two views
        (y * 2).sum()  # two operators
    assert ops.count == 3


def test_covered_time_is_the_union_of_the_intervals():
    """Against a brute-force timeline: every nanosecond that some interval covers counts once."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        starts = torch.randint(0, 200, (12,), generator=generator)
        lengths = torch.randint(0, 40, (12,), generator=generator)
        intervals = [(int(s), int(s + n)) for s, n in zip(starts, lengths, strict=True)]
        timeline = torch.zeros(300, dtype=torch.bool)
        for start, end in intervals:
            timeline[start:end] = True
        assert bench.covered_ns(intervals) == int(timeline.sum())
    assert bench.covered_ns([]) == 0


@pytest.mark.slow
def test_capture_only_times_the_trace_and_the_compile_of_a_graphs_config(tmp_path, capsys):
    out = tmp_path / "capture.json"
    common = ["--preset", "tiny", "--batch", "2", "--device", "cpu", "--capture-only", "--out", str(out)]
    with pytest.raises(SystemExit):  # the eager configs have no whole step to capture
        bench.main([*common, "--configs", "fp32-cl"])
    assert "'fp32-cl' is not one" in capsys.readouterr().err
    bench.main([*common, "--configs", "fp32-cl-graphs", "--capture-backend", "aot_eager"])
    report = json.loads(out.read_text())
    result = report["results"]["fp32-cl-graphs"]
    assert report["capture_only"] and result["backend"] == "aot_eager" and result["graphs"] == 1
    assert 0 < result["trace_s"] and 0 < result["compile_s"]
    assert result["trace_s"] + result["compile_s"] < result["first_step_s"] <= result["capture_s"]
    assert 0 < result["graph_ops"] < 200


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_bench_phase_on_the_cpu(tmp_path):
    """scripts/gpu-check as a GPU machine runs it (the package copied with its configs, no install), made
    small: its bench phase writes the JSON and the log into OUT."""
    settings = dict(DEVICE="cpu", PRESET="tiny", BATCHES="2 4", STEPS="1", WARMUP="1", PHASES="bench16 nothing")
    env = {**os.environ, **settings, "PYTHON": sys.executable, "CONFIGS": "fp32-cl fp32-cl-graphs", "ORIGINAL": ""}
    result = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "run", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench_b2.json").read_text())
    assert list(report["results"]) == ["fp32-cl", "fp32-cl-graphs"] and report["batch"] == 2
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "unknown phase nothing" in log and "done in" in log


@pytest.mark.slow
def test_a_config_that_fails_is_reported_and_the_others_still_run(tmp_path):
    out = tmp_path / "bench.json"
    common = ["--preset", "tiny", "--batch", "2", "--device", "cpu", "--steps", "1", "--warmup", "1"]
    with pytest.raises(SystemExit, match="bench configs failed: fp32\\+model.vae.zdim=0"):
        bench.main([*common, "--configs", "fp32+model.vae.zdim=0", "fp32", "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["fp32"] and report["results"]["fp32"]["train_images_per_s"] > 0
    assert "zdim must be positive" in report["failed"]["fp32+model.vae.zdim=0"]
