"""The benchmark runs end to end on the tiny preset (a smoke test: no timing is asserted)."""

import json

from vdvae import bench
from vdvae.model import VAE


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
            "bf16-cl",
            "fp32-ckpt",
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
    n_params = sum(p.numel() for p in VAE(**hparams["vae"]).parameters())
    assert set(report["results"]) == {"fp32", "bf16-cl", "fp32-ckpt"}
    for result in report["results"].values():
        for key in (
            "train_images_per_s",
            "eval_images_per_s",
            "sample_images_per_s",
            "peak_memory_mb",
            "gflop_per_image_train",
            "fraction_of_peak",
            "speedup_vs_fp32",
        ):
            assert result[key] > 0 or key == "peak_memory_mb", key
        assert result["gflop_per_image_train"] > 2 * result["gflop_per_image_forward"]
        assert result["skipped"] == 0
        # Live tensors at the peak hold at least the weights, gradients, both Adam moments and the EMA.
        assert result["allocated_peak_mb"] * 2**20 >= 5 * 4 * n_params
