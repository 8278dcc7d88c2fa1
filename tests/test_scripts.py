"""train.py as a user runs it (subprocesses): 2-process CPU DDP and the config errors that must stop
before any output (sweeps, resume and signals: test_readme.py and test_reliability.py)."""

import json

import pytest
import torch

from tests.run_helpers import TINY_RUN, run, run_dirs

pytestmark = pytest.mark.slow  # subprocesses: a minute or more each module


def test_two_process_ddp_with_accumulation_keeps_ranks_identical_and_tests_every_image_once(tmp_path):
    probe = f"+callbacks.probe._target_=tests.ddp_probe.RankProbe +callbacks.probe.dirpath={tmp_path / 'probe'}"
    result = run(
        "train.py",
        tmp_path,
        *TINY_RUN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_steps=52",  # two epochs of 1,300 images in 2 x 25
        "data.batch_size=5",  # ... each 25 in 5 parts, their gradients all-reduced once per update
        "trainer.accumulate_grad_batches=5",
        *probe.split(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["steps"] == ranks[1]["steps"] == 52
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"] and ranks[0]["ema_sum"] == ranks[1]["ema_sum"]
    # 297 test images: 149 + 148, none padded or dropped, and the metric counts each once.
    assert sorted(r["test_images_seen"] for r in ranks) == [148, 149]
    assert ranks[0]["test_n_images"] == 297


@pytest.mark.parametrize(
    "args,message",
    [
        (["model.vae.nonsense=3"], "nonsense"),
        (["model=tiny", "data=fashion_mnist"], "model.vae.image_size=8 does not match data.image_size=28"),
        (
            ["model=tiny", "data=digits", "data.binarize=true"],
            "data.binarize=True needs model.vae.likelihood=bernoulli",
        ),
        (["model=tiny", "data=digits", "trainer.precision=16-mixed"], "use trainer.precision=bf16-mixed"),
        (["model=tiny", "data=digits", "trainer.accumulate_grad_batches=0"], "it must be an integer >= 1"),
        (["model=tiny", "data=digits", "+trainer.gradient_clip_val=1"], "set model.grad_clip"),
        (["model=tiny", "data=digits", "trainer.max_steps=1e3"], "trainer.max_steps=1000.0 is not valid"),
        (["model=tiny", "data=digits", "trainer.strategy=dpp"], "invalid strategy name"),  # refused by Lightning
        (
            [
                "model=tiny",
                "data=cifar10",
                "model.vae.image_size=32",
                "model.vae.image_channels=3",
                "model.vae.enc_blocks='32x1,32d4,8d8,1x1'",
                "model.vae.dec_blocks='1x1,8m1,32m8'",
                "data.download=false",
                "data.root=/nonexistent",
            ],
            "cifar10: no data found",
        ),
    ],
)
def test_config_and_data_errors_are_clear_and_leave_nothing(tmp_path, args, message):
    result = run("train.py", tmp_path, *args, "logger=csv")
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert run_dirs(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize(
    "script, args", [("train.py", ["model=tiny", "data=digits"]), ("eval.py", ["ckpt_path=checkpoints/last.ckpt"])]
)
def test_a_gpu_trainer_on_a_machine_without_one_says_so_and_leaves_nothing(tmp_path, script, args):
    result = run(script, tmp_path, *args, "trainer=gpu", "logger=csv")
    assert result.returncode != 0 and "torch finds no CUDA GPU on this machine: use trainer=cpu" in result.stderr
    assert run_dirs(tmp_path, script.removesuffix(".py")) == []


def test_corrupt_data_file_is_named_and_leaves_nothing(tmp_path):
    from tests.fixtures import make_mnist

    make_mnist(tmp_path / "mnist", gz=False)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    result = run(
        "train.py",
        tmp_path,
        "model=small",
        "data=mnist",
        f"data.root={tmp_path / 'mnist'}",
        "data.download=false",
        "data.val_size=5",
        "logger=csv",
    )
    assert result.returncode != 0
    assert "t10k-images-idx3-ubyte is not an idx3-ubyte image file (bad header)" in result.stderr
    assert run_dirs(tmp_path) == []
