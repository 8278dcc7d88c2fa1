"""Training end to end: a short run improves, resume is exact, bad updates are skipped and counted,
a run that skips forever stops with a message, options (bf16, debug presets) run."""

import csv
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader

from tests.conftest import TINY_VAE, build_model
from tests.run_helpers import TINY_RUN, LastCheckpointProbe, run_in_process
from vdvae import VDVAEModule
from vdvae.lifecycle import route_library_logs


def logged(run_dir, key: str) -> list[float]:
    """The values of `key` in a run's CSV log, in order."""
    with open(next(run_dir.glob("csv/version_*/metrics.csv"))) as file:
        return [float(r[key]) for r in csv.DictReader(file) if r.get(key)]


def val_bpd(run_dir):
    return logged(run_dir, "val/bpd")


def test_short_run_reduces_val_bpd_and_writes_outputs(tmp_path):
    metric, _ = run_in_process(tmp_path, *TINY_RUN, "trainer.max_epochs=4")
    bpd = val_bpd(tmp_path)
    assert len(bpd) == 4  # one per epoch
    assert bpd[-1] < bpd[0] - 0.3, bpd
    assert metric == pytest.approx(bpd[-1], rel=1e-5)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    images = {p.name.split("_step")[0] for p in (tmp_path / "images").glob("*.png")}
    assert {"test_samples_t1", "test_samples_t0", "test_reconstructions", "test_rate_per_group"} <= images


def test_resume_is_exact(tmp_path):
    run_in_process(tmp_path / "full", *TINY_RUN, "trainer.max_epochs=3", "test=false")
    run_in_process(tmp_path / "part", *TINY_RUN, "trainer.max_epochs=1", "test=false")
    run_in_process(
        tmp_path / "resumed",
        *TINY_RUN,
        "trainer.max_epochs=3",
        "test=false",
        f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}",
    )
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"] > 0
    for key, value in full["state_dict"].items():  # weights, EMA and counters
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(
        full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert full["lr_schedulers"] == resumed["lr_schedulers"]
    assert val_bpd(tmp_path / "full")[-1] == val_bpd(tmp_path / "resumed")[-1]


def test_a_resume_takes_this_runs_learning_rate_and_resumes_from_a_wandb_artifact(tmp_path, monkeypatch):
    # Trained at model.lr=3e-3 (TINY_RUN), resumed from the W&B artifact of its last.ckpt at 1e-3: the run
    # continues from the downloaded file, at the configured rate (the restored optimizer's is replaced).
    run_in_process(tmp_path / "part", *TINY_RUN, "trainer.max_epochs=1", "test=false")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    shutil.copy(tmp_path / "part" / "checkpoints" / "last.ckpt", artifact / "model.ckpt")

    class Api:  # W&B's, offline: the artifact is already downloaded
        def artifact(self, name, type):
            assert (name, type) == ("me/vdvae/model-run:v3", "model")
            return SimpleNamespace(download=lambda: str(artifact))

    monkeypatch.setattr("wandb.Api", Api)
    run = [o for o in TINY_RUN if not o.startswith("model.lr=")]
    resume = ["model.lr=1e-3", "trainer.max_epochs=2", "test=false", "ckpt_path=wandb:me/vdvae/model-run:v3"]
    run_in_process(tmp_path / "resumed", *run, *resume)
    before, after = (
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True) for name in ("part", "resumed")
    )
    assert after["global_step"] == 2 * before["global_step"] > 0  # continued: the second epoch only
    assert before["lr_schedulers"][0]["base_lrs"] == [3e-3] and after["lr_schedulers"][0]["base_lrs"] == [1e-3]
    assert after["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)  # past warm-up


def test_accumulated_batches_make_the_update_of_their_whole_batch(tmp_path, monkeypatch):
    # 2 x 25 images per update against 50 at once: the same images in every update (the loaded batch holds
    # both parts), so the same gradient (its norm, before clipping, is logged), loss and weights; with the
    # posterior's noise fixed, as the parts would draw it in another order.
    monkeypatch.setattr(
        "vdvae.model.vae.gaussian_sample", lambda mean, logstd, temperature=1.0: mean + logstd.exp() / 2
    )
    run = [*TINY_RUN, "trainer.max_steps=5", "test=false", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1"]
    whole, _ = run_in_process(tmp_path / "whole", *run, "data.batch_size=50")
    parts, cfg = run_in_process(tmp_path / "parts", *run, "data.batch_size=25", "trainer.accumulate_grad_batches=2")
    assert cfg.trainer.accumulate_grad_batches == 2
    a, b = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True) for name in ("whole", "parts"))
    assert a["global_step"] == b["global_step"] == 5  # updates, not parts
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for key in ("train/grad_norm", "train/loss"):
        assert len(logged(tmp_path / "parts", key)) == 5
        assert logged(tmp_path / "parts", key) == pytest.approx(logged(tmp_path / "whole", key), rel=1e-5), key


class Snapshots:
    """Copies of the weights and EMA before every training step."""

    def __init__(self):
        self.before = []

    def __call__(self, module):
        self.before.append(
            (
                [p.detach().clone() for p in module.vae.parameters()],
                [p.detach().clone() for p in module.ema.parameters()],
            )
        )


def fit_on_batches(module, batches, **trainer_kwargs):
    snapshots = Snapshots()
    module.on_train_batch_start = lambda batch, idx: snapshots(module)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    snapshots(module)
    return snapshots.before


def test_nan_and_huge_gradient_batches_are_skipped_and_counted():
    torch.manual_seed(0)
    module = VDVAEModule(TINY_VAE, warmup_steps=1, lr=1e-3, skip_threshold=1e4, ema_decay=0.5)
    x = torch.randint(0, 256, (4, 1, 8, 8)).float()
    good = ((x - 127.5) / 127.5, (x - 127.5) / 127.5)
    nan = (good[0].clone().fill_(float("nan")), good[1])
    huge = (good[0] * 1e6, good[1])  # inputs a million times too large: a gradient far above the threshold
    states = fit_on_batches(module, [good, nan, good, huge, good])
    assert int(module.skipped_steps) == 2 and int(module.attempted_steps) == 5
    moved = [not all(torch.equal(a, b) for a, b in zip(states[i][0], states[i + 1][0], strict=True)) for i in range(5)]
    ema_moved = [
        not all(torch.equal(a, b) for a, b in zip(states[i][1], states[i + 1][1], strict=True)) for i in range(5)
    ]
    # Step 0 has lr 0 (warm-up) but the EMA still moves towards the (unchanged) weights only once they differ.
    assert moved[1:] == [False, True, False, True]
    assert ema_moved[1] is False and ema_moved[3] is False and ema_moved[2] and ema_moved[4]


def test_a_run_that_skips_every_update_stops_with_a_message(tmp_path):
    route_library_logs()  # as train() does, before pytest.warns records (else the warning goes to logging)
    with pytest.warns(UserWarning, match="3 consecutive updates skipped"):
        with pytest.raises(RuntimeError, match="consecutive updates were skipped.*model.skip_threshold"):
            run_in_process(
                tmp_path,
                *TINY_RUN,
                "model.skip_threshold=1e-9",
                "model.skip_warn_after=3",
                "model.max_consecutive_skips=6",
                "trainer.max_epochs=5",
            )
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # the work so far is kept


def test_bf16_autocast_step_is_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("tiny")
    x = torch.randint(0, 256, (8, 1, 8, 8)).float()
    inputs, target = (x - 127.5) / 127.5, (x - 127.5) / 127.5
    torch.manual_seed(1)
    fp32 = model(inputs, target).loss.mean()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(inputs, target).loss.mean()
    assert bf16.dtype == torch.float32 and math.isfinite(bf16.item())
    assert abs(bf16.item() - fp32.item()) < 0.02 * abs(fp32.item())


@pytest.mark.parametrize(
    "extra",
    [
        ["debug=fdr"],
        ["debug=limit", "trainer.precision=bf16-mixed"],
        ["model=vae", "debug=fdr"],
        ["debug=overfit", "trainer.max_epochs=2"],
    ],
)
def test_debug_presets_and_bf16_run_on_mnist_files(tmp_path, extra):
    from tests.fixtures import make_mnist

    make_mnist(tmp_path / "mnist")
    model = (
        []
        if "model=vae" in extra
        else [
            "model.vae.image_size=28",
            "model.vae.enc_blocks='28x1,28d4,7d7,1x1'",
            "model.vae.dec_blocks='1x1,7m1,28m7'",
        ]
    )
    run_in_process(
        tmp_path / "run",
        *TINY_RUN,
        "data=mnist",
        *model,
        *extra,
        f"data.root={tmp_path / 'mnist'}",
        "data.val_size=10",
        "data.batch_size=10",
        "data.download=false",
    )


def _fixture(kind, root):
    from tests import fixtures

    if kind == "cifar10":
        return fixtures.make_cifar10(root)
    if kind in ("mnist", "fashion_mnist", "binarized_mnist"):
        return fixtures.make_mnist(root)
    if kind.startswith("imagenet"):
        form = kind.split("-")[1]
        return fixtures.make_imagenet(root, form, size=32 if kind.startswith("imagenet32") else 64)
    if kind == "ffhq256":
        fixtures.write_pngs(root, 8, 256)
        return root
    if kind == "ffhq1024":
        fixtures.write_pngs(root / "train", 2, 1024)
        fixtures.write_pngs(root / "valid", 1, 1024)
        return root
    fixtures.write_pngs(root, 8, 20)  # image_folder: resized to 16
    return root


def _tiny_architecture(size, channels):
    """A minimal model for square images of `size` (a power of 2 times 7 or of 2)."""
    resolutions = [size]
    while resolutions[-1] > 4 and resolutions[-1] % 4 == 0:
        resolutions.append(resolutions[-1] // 4)
    enc = (
        ",".join(f"{r}d{r // resolutions[i + 1]}" for i, r in enumerate(resolutions[:-1]))
        + f",{resolutions[-1]}d{resolutions[-1]},1x1"
    )
    dec = "1x1," + ",".join(
        f"{r}m{q}" for r, q in zip(reversed(resolutions), [1, *reversed(resolutions[1:])], strict=True)
    )
    return [
        f"model.vae.image_size={size}",
        f"model.vae.image_channels={channels}",
        "model.vae.width=8",
        f"model.vae.enc_blocks='{enc}'",
        f"model.vae.dec_blocks='{dec}'",
    ]


@pytest.mark.parametrize(
    "data,kind,size,channels,extra",
    [
        ("cifar10", "cifar10", 32, 3, ["data.download=false"]),
        ("fashion_mnist", "fashion_mnist", 28, 1, ["data.download=false"]),
        ("binarized_mnist", "binarized_mnist", 28, 1, ["data.download=false", "model.vae.likelihood=bernoulli"]),
        ("imagenet32", "imagenet32-npy", 32, 3, []),
        ("imagenet32", "imagenet32-npz", 32, 3, []),
        ("imagenet64", "imagenet64-png", 64, 3, []),
        ("ffhq256", "ffhq256", 256, 3, ["model.vae.bits=5"]),
        # 1024x1024: one image per batch, and no image grids (a minute)
        (
            "ffhq1024",
            "ffhq1024",
            1024,
            3,
            ["data.val_size=1", "data.batch_size=1", "data.eval_batch_size=1", "~callbacks.image_grids"],
        ),
        ("image_folder", "image_folder", 16, 3, ["data.image_size=16"]),
        ("digits", "digits", 8, 1, []),
    ],
)
def test_fast_dev_run_on_every_data_module(tmp_path, data, kind, size, channels, extra):
    root = _fixture(kind, tmp_path / "data")
    run_in_process(
        tmp_path / "run",
        *TINY_RUN,
        f"data={data}",
        f"data.root={root}",
        "data.val_size=3",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "debug=fdr",
        *_tiny_architecture(size, channels),
        *extra,
    )


@pytest.mark.parametrize("off", [-1, None])
def test_skip_threshold_minus_one_or_null_turns_the_norm_test_off_as_in_the_original(off):
    torch.manual_seed(0)
    module = VDVAEModule(TINY_VAE, warmup_steps=1, lr=1e-3, skip_threshold=off, ema_decay=0.5)
    x = torch.randint(0, 256, (4, 1, 8, 8)).float()
    good = ((x - 127.5) / 127.5, (x - 127.5) / 127.5)
    large = (good[0] * 100, good[1])  # a finite gradient norm of ~100 (good: ~1.3)
    nan = (good[0].clone().fill_(float("nan")), good[1])  # non-finite: still skipped
    fit_on_batches(module, [good, large, nan])
    assert int(module.skipped_steps) == 1 and int(module.attempted_steps) == 3
    with_threshold = VDVAEModule(TINY_VAE, warmup_steps=1, lr=1e-3, skip_threshold=50.0, ema_decay=0.5)
    fit_on_batches(with_threshold, [good, large, nan])
    assert int(with_threshold.skipped_steps) == 2  # the same batches with the norm test on


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_its_recursion_with_and_without_warmup_and_skips(warmup):
    torch.manual_seed(0)
    decay = 0.95
    module = VDVAEModule(TINY_VAE, warmup_steps=1, lr=1e-2, ema_decay=decay, ema_warmup=warmup)
    x = torch.randint(0, 256, (4, 1, 8, 8)).float()
    good = ((x - 127.5) / 127.5, (x - 127.5) / 127.5)
    nan = (good[0].clone().fill_(float("nan")), good[1])
    batches = [good, good, nan, good, good, good]
    states = fit_on_batches(module, batches)
    # Independent: ema <- ema + (1 - d_n) (weights - ema) in float64, n counting applied updates only.
    recursions = {True: [p.double() for p in states[0][1]], False: [p.double() for p in states[0][1]]}
    applied = 0
    for t, batch in enumerate(batches):
        if batch is nan:
            continue
        for kind, ema in recursions.items():
            d = min(decay, (1 + applied) / (10 + applied)) if kind else decay
            recursions[kind] = [e + (1 - d) * (w.double() - e) for e, w in zip(ema, states[t + 1][0], strict=True)]
        applied += 1
    for expected, got in zip(recursions[warmup], states[-1][1], strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)

    def distance(ema):  # from the final weights
        return sum(((e - w.double()) ** 2).sum() for e, w in zip(ema, states[-1][0], strict=True)).sqrt()

    assert distance(recursions[True]) < 0.5 * distance(recursions[False])  # the warm-up's point


@pytest.mark.parametrize("interval,expected", [(1e-9, "every step"), (1e9, "never")])
def test_last_checkpoint_follows_its_time_interval(tmp_path, interval, expected):
    run_in_process(
        tmp_path,
        *TINY_RUN,
        "trainer.max_steps=6",
        "test=false",
        "trainer.limit_val_batches=0",
        "callbacks.last_checkpoint.every_n_train_steps=null",
        f"callbacks.last_checkpoint.train_time_interval={interval}",
        "+callbacks.probe._target_=tests.run_helpers.LastCheckpointProbe",
        f"+callbacks.probe.dirpath={tmp_path / 'checkpoints'}",
    )
    probe = LastCheckpointProbe.made[-1]
    if expected == "every step":
        assert all(step == on_disk for step, on_disk in probe.saved)
    else:  # only the final step (saved at max_steps)
        assert [on_disk for _, on_disk in probe.saved[:-1]] == [None] * 5 and probe.saved[-1] == (6, 6)


def test_a_crash_in_training_leaves_last_ckpt_at_the_step_it_reached(tmp_path):
    with pytest.raises(RuntimeError, match="a crash in training"):
        run_in_process(
            tmp_path,
            *TINY_RUN,
            "trainer.max_steps=20",
            "callbacks.last_checkpoint.every_n_train_steps=100",
            "+callbacks.probe._target_=tests.run_helpers.LastCheckpointProbe",
            f"+callbacks.probe.dirpath={tmp_path / 'checkpoints'}",
            "+callbacks.probe.fail_at=5",
        )
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_a_crash_in_the_middle_of_an_update_leaves_last_ckpt_at_the_last_whole_one(tmp_path, monkeypatch, caplog):
    # Between the optimizer's step and the EMA's (a second Ctrl-C, a failure there): a save would mix two updates.
    update_ema = VDVAEModule.update_ema

    def failing(module, weight):
        if int(module.attempted_steps) == 4:  # in update 5: the weights moved, the EMA and counters not yet
            raise RuntimeError("a crash mid-update")
        update_ema(module, weight)

    monkeypatch.setattr(VDVAEModule, "update_ema", failing)
    with pytest.raises(RuntimeError, match="a crash mid-update"):
        run_in_process(tmp_path, *TINY_RUN, "trainer.max_steps=20", "callbacks.last_checkpoint.every_n_train_steps=2")
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == int(saved["state_dict"]["attempted_steps"]) == 4
    assert "in the middle of update 5: not saved" in caplog.text


def test_image_grids_take_at_most_their_share_of_training_time(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vdvae import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    grids = callbacks.ImageGrids(str(tmp_path), max_time_share=0.1)
    drawn = []

    def draw(trainer, module, dataset, stage):  # each drawing takes 30 s
        clock[0] += 30
        drawn.append(clock[0])

    monkeypatch.setattr(grids, "draw", draw)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, global_step=0, datamodule=SimpleNamespace())
    trainer.datamodule.val_set = trainer.datamodule.test_set = None
    grids.on_train_start(trainer, None)
    for _ in range(20):  # a validation every 60 s of training
        clock[0] += 60
        grids.on_validation_end(trainer, None)
    # Drawn at the first validation (t=60), then at the first validation where the grids so far took at most
    # 10% of the time: 30 s <= 33 at t=330, 60 <= 60 at t=600, 90 <= 93 at t=930, 120 <= 120 at t=1200.
    assert drawn == [90, 360, 630, 960, 1230]
    grids.on_test_end(trainer, None)  # the final grids are always drawn
    assert len(drawn) == 6


def test_a_checkpoint_holds_the_generator_state_of_its_own_gpu_only(monkeypatch):
    # Every visible GPU's state, restored by index, failed on a machine with fewer GPUs (IndexError as
    # training started) and restored another device's where a rank's device index changed.
    from vdvae.resume import ResumeState, own_cuda_state

    own = torch.full((16,), 7, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: own)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
    checkpoint = {}
    ResumeState().on_save_checkpoint(SimpleNamespace(loggers=[]), VDVAEModule(TINY_VAE), checkpoint)
    (state,) = checkpoint["rng_states"]
    assert len(state["cuda"]) == 1 and torch.equal(state["cuda"][0], own)
    assert own_cuda_state(state["cuda"]) is state["cuda"][0]
    older = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # every GPU's, by index
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert own_cuda_state(older) is older[1]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # the saving machine had two GPUs
    assert own_cuda_state(older) is older[0]


def test_a_cosine_without_a_length_is_refused_before_the_loggers_start(tmp_path):
    with pytest.raises(ValueError, match="model.lr_schedule=cosine needs model.decay_steps or a trainer.max_steps"):
        run_in_process(tmp_path, *TINY_RUN, "model.lr_schedule=cosine", "trainer.max_steps=-1", "trainer.max_epochs=1")
    assert not (tmp_path / "csv").exists()  # the logger never started (the command removes its run directory)


def test_a_resume_that_changes_the_cosines_length_says_so_and_how_to_keep_it(tmp_path, caplog):
    cosine = [*TINY_RUN, "model.lr_schedule=cosine", "test=false", "trainer.limit_val_batches=0"]
    run_in_process(tmp_path / "part", *cosine, "trainer.max_steps=10")
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["cosine_length"] == 5  # after the 5 warm-up steps
    run_in_process(tmp_path / "kept", *cosine, "trainer.max_steps=12", "model.decay_steps=5", f"ckpt_path={last}")
    assert "cosine schedule's length" not in caplog.text
    run_in_process(tmp_path / "longer", *cosine, "trainer.max_steps=12", f"ckpt_path={last}")
    assert "the cosine schedule's length is 7 now, 5 when the checkpoint was saved" in caplog.text
    assert "model.decay_steps=5 keeps the saved schedule" in caplog.text


def test_ckpt_path_alone_brings_back_the_runs_overrides_with_the_typed_ones_winning(tmp_path):
    from vdvae import resume

    path = tmp_path / "last.ckpt"
    recorded = ["model=tiny", "data=digits", "trainer.max_steps=20", "+callbacks.extra.step=3", "hparams_search=optuna"]
    torch.save({"state_dict": {}, "hyper_parameters": {}, "overrides": recorded}, path)
    argv = ["train.py", "trainer.max_steps=40", f"ckpt_path={path}", "data.batch_size=8"]
    assert resume.with_recorded_overrides(argv) == [
        "train.py", "trainer.max_steps=40", f"ckpt_path={path}",
        "model=tiny", "data=digits", "+callbacks.extra.step=3", "data.batch_size=8",
    ]  # fmt: skip  (an Optuna trial's checkpoint resumes as a run, not as a study)
    sweep = ["train.py", "-m", "hydra/launcher=slurm", f"ckpt_path={path}", "model.lr=1e-4,2e-4"]
    recorded = ["model=tiny", "data=digits", "trainer.max_steps=20", "+callbacks.extra.step=3"]
    assert resume.with_recorded_overrides(sweep) == [*sweep[:4], *recorded, sweep[4]]  # also for a sweep (SLURM)
    missing = ["train.py", f"ckpt_path={tmp_path / 'none.ckpt'}"]
    assert resume.with_recorded_overrides(missing) == missing  # the run's own checks explain it


@pytest.mark.parametrize(
    "recorded, why",
    [
        (["hydra.run.dir=/"], "Hydra's own settings"),
        (["hydra/launcher=slurm"], "Hydra's own settings"),
        (["+callbacks.x._target_=os.system"], "names code to run"),
        (["model.vae={_target_: os.system, command: ls}"], "names code to run"),
        (["model=tiny", "data=digits data.x=1 ]["], "does not parse"),
        ("model=tiny", "not a list of strings"),
        ([["model=tiny"]], "not a list of strings"),
    ],
)
def test_recorded_overrides_that_name_code_or_hydra_are_refused_in_one_line(tmp_path, capsys, recorded, why):
    from vdvae import resume

    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "overrides": recorded}, path)
    with pytest.raises(SystemExit) as stop:
        resume.with_recorded_overrides(["train.py", f"ckpt_path={path}"])
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert why in error and error.count("\n") == 1 and str(path) in error


def test_logger_none_trains_and_evaluates_with_no_logger_and_still_saves_the_grids(tmp_path):
    from tests.run_helpers import job_config
    from vdvae.tasks.eval import evaluate

    quiet = [o for o in TINY_RUN if o != "logger=csv"] + ["logger=none", "trainer.max_steps=3", "test=false"]
    run_in_process(tmp_path / "run", *quiet)
    made = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"checkpoints", "images"} <= made and not made & {"csv", "wandb", "tensorboard"}, made
    assert list((tmp_path / "run" / "images").glob("val_samples_t1_*.png"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evaluate(job_config(tmp_path / "eval", "eval", f"ckpt_path={ckpt}", "logger=none", "trainer=cpu"))
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"eval.json"}


def test_training_off_a_terminal_writes_a_progress_line_in_steps_of_max_steps(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VDVAE_PROGRESS_SECONDS", "0")  # a line at every step, not every 30 s
    quiet = [o for o in TINY_RUN if "enable_" not in o] + ["trainer.max_steps=3", "test=false"]
    with caplog.at_level("INFO", logger="vdvae"):
        run_in_process(tmp_path, *quiet)
    lines = [r.getMessage() for r in caplog.records if r.name == "vdvae.progress"]
    assert [line.split(" (")[0] for line in lines] == [f"training: {n} of 3 steps" for n in (1, 2, 3)], lines
    assert all(re.search(r"steps/s, \d+ s left; train/bpd \d+\.\d{4}$", line) for line in lines), lines
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the module's parts")]
    assert summary and "FLOPs" not in summary[0] and "vae          VAE" in summary[0]


def test_progress_lines_say_done_rate_and_time_left(monkeypatch, caplog):
    from vdvae import progress

    clock = iter([0.0, 10.0, 40.0, 41.0, 100.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with caplog.at_level("INFO", logger="vdvae.progress"):
        with progress.ProgressLines(1000, "compressing") as lines:  # started at 0
            lines.update(100)  # 10 s: no line yet
            lines.update(300)  # 40 s: 400 done at 10 images/s, 600 left
            lines.update(500)  # 41 s: within 30 s of the last line
        # closed at 100 s, with 900 done: a last line
    assert [r.getMessage() for r in caplog.records] == [
        "compressing: 400 of 1,000 images (40%), 10 images/s, 1 min 0 s left",
        "compressing: 900 of 1,000 images (90%), 9 images/s, 11 s left",
    ]
    assert progress.duration(3 * 3600 + 12 * 60 + 5) == "3 h 12 min"
