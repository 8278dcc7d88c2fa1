"""Evaluation (IW bound, active units, exact counts), latents that decode to reconstructions, the import of
the original's checkpoints, bad checkpoints, and the notebook, on a tiny model trained by the tests (every
sampling mode as the README runs it: test_readme.py). The grids of training and sample.py are legible and
labelled, and the commands write no progress bar where stderr is not a terminal (and one where it is)."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from tests.conftest import DATA, ROOT, build_model, perturb_, random_batch
from tests.run_helpers import TINY_RUN, run, run_dirs, run_in_process, sample_in_process, shows_progress, start
from vdvae.checkpoints import CheckpointError, load_module
from vdvae.grids import PAD, labels
from vdvae.metrics import ActiveUnits, IWMetric, iw_bound, log_weights

EXPECTED = json.loads((DATA / "expected.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run_in_process(out, *TINY_RUN, "trainer.max_epochs=3", "test=false")
    return out / "checkpoints" / "last.ckpt"


def test_iw_with_one_sample_is_the_single_sample_elbo():
    model = perturb_(build_model("tiny"), scale=0.1)
    x, target = random_batch(model, n=3)
    torch.manual_seed(5)
    iw1 = iw_bound(model, x, target, k=1)
    torch.manual_seed(5)
    with torch.no_grad():
        mc = log_weights(model, x, target)
    torch.testing.assert_close(iw1, mc)


def test_iw_metric_and_active_units_agree_with_torch_mean_std_and_var():
    gen = torch.Generator().manual_seed(0)
    values = 100 + torch.randn(37, generator=gen)  # an offset that a one-pass variance must survive
    metric = IWMetric()
    for chunk in values.split(10):
        metric.update(chunk)
    mean, stderr = metric.compute()
    torch.testing.assert_close(mean, values.double().mean())
    torch.testing.assert_close(stderr, values.double().std() / math.sqrt(37))
    means = [torch.randn(9, 2, 3, 3, generator=gen) * torch.tensor([0.05, 1.0]).view(1, 2, 1, 1)]
    units = ActiveUnits([9, 9], threshold=0.01)  # two groups: the quiet channel, then the loud one
    units.update(means)
    expected = (means[0].flatten(1).double().var(dim=0) > 0.01).view(2, 9).sum(1)
    assert units.compute().tolist() == expected.tolist() and expected[1] == 9


def test_iw_bound_is_above_the_elbo_and_grows_with_k():
    torch.manual_seed(0)
    model = perturb_(build_model("tiny"), scale=0.1)
    x, target = random_batch(model, n=4)
    reps = 500
    with torch.no_grad():
        elbo = model(x.repeat(reps, 1, 1, 1), target.repeat(reps, 1, 1, 1)).elbo.mean()  # analytic KL
        single = log_weights(model, x.repeat(reps, 1, 1, 1), target.repeat(reps, 1, 1, 1))  # IW_1 draws
    assert abs(single.mean() - elbo) < 4 * single.std() / math.sqrt(single.numel())  # E[IW_1] = ELBO
    # Pruned (half the variates of each group from the prior): the pruned model's ELBO, not the whole one's.
    masks = [torch.arange(zdim) % 2 == 0 for zdim, _, _ in model.latent_shapes]
    with torch.no_grad():
        pruned = model(x.repeat(reps, 1, 1, 1), target.repeat(reps, 1, 1, 1), variate_masks=masks).elbo.mean()
        draws = log_weights(model, x.repeat(reps, 1, 1, 1), target.repeat(reps, 1, 1, 1), masks)
    assert abs(draws.mean() - pruned) < 4 * draws.std() / math.sqrt(draws.numel()) and abs(pruned - elbo) > 0.5
    bounds = {}
    for k in (1, 8, 64, 512):
        torch.manual_seed(1)
        bounds[k] = torch.stack([iw_bound(model, x, target, k) for _ in range(4)]).mean()
    assert bounds[1] < bounds[8] < bounds[64] < bounds[512]
    assert bounds[512] > elbo + 1.0


@pytest.mark.slow  # the command as typed, in a process of its own
def test_eval_script_scores_every_test_image_once(trained, tmp_path):
    lines_at_once = {"VDVAE_PROGRESS_SECONDS": "0"}  # a progress line at every batch, not every 30 s
    result = run("eval.py", tmp_path, f"ckpt_path={trained}", "iw_samples=4", "trainer=cpu", env=lines_at_once)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = run_dirs(tmp_path, "eval")
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    assert m["test/n_images"] == 297
    assert m["test/bpd"] == pytest.approx(m["test/nats_per_dim"] / math.log(2), rel=1e-5)
    assert m["test/iw_nats_per_image"] <= m["test/nats_per_image"] + 3 * m["test/iw_stderr_nats"]
    assert len(report["kl_per_group_nats"]) == len(report["active_units_per_group"]) == 5
    assert "test/bpd" in result.stdout  # the table
    assert not shows_progress(result.stdout + result.stderr)  # no bar, Lightning's or ours, off a terminal
    # but plain lines: 100-image batches, the IW bound included
    done = re.findall(r"evaluating: ([\d,]+) of 297 images \(\d+%\), [\d.e+]+ images/s, \d+ s left", result.stdout)
    assert done == ["100", "200", "297"], result.stdout[-3000:]


@pytest.mark.slow  # the command as typed, in a process of its own
def test_encode_then_decode(trained, tmp_path):
    result = run("sample.py", tmp_path, f"ckpt_path={trained}", "mode=encode")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not shows_progress(result.stderr)
    (encoded,) = run_dirs(tmp_path, "sample")
    record = torch.load(encoded / "latents.pt", weights_only=True)
    assert [z.shape[-1] for z in record["latents"]] == record["resolutions"] == [1, 4, 4, 8, 8]
    result = run(
        "sample.py",
        tmp_path,
        f"ckpt_path={trained}",
        "mode=decode",
        f"latents={encoded / 'latents.pt'}",
        "temperatures=[0.0]",
        "batch_size=3",  # 8 images in passes of 3, 3 and 2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not shows_progress(result.stderr)
    (decoded,) = set(run_dirs(tmp_path, "sample")) - {encoded}
    for grid in (encoded / "encoded_images.png", decoded / "decoded.png"):
        assert_legible(grid, rows=1, columns=8)
    assert "5 of 5 groups given" in labels(decoded / "decoded.png")["Title"]
    assert not [p for d in (encoded, decoded) for p in d.iterdir() if ".tmp" in p.name]  # outputs renamed into place
    # The saved latents are those of the first 8 test images: decoding them is their reconstruction.
    module, checkpoint = load_module(trained)
    from hydra.utils import instantiate

    data = instantiate(checkpoint["data_config"])
    data.setup("test")
    inputs, _ = data.preprocess(torch.stack([data.test_set[i] for i in range(8)]))
    torch.testing.assert_close(module.ema.encode(inputs), record["latents"])
    assert torch.equal(module.ema.decode(record["latents"], mode=True), module.ema.reconstruct(inputs, mode=True))


def assert_legible(path, rows: int, columns: int):
    """A grid of 8x8 digits scaled to at least 64 px per image, with a title band above that is not blank."""
    from PIL import Image

    with Image.open(path) as png:
        array = np.asarray(png.convert("L"))
    cells = rows * (64 + PAD)
    assert array.shape[1] >= columns * (64 + PAD) and array.shape[0] > cells + 10, array.shape
    assert array[: array.shape[0] - cells].min() < 128  # dark text on the white band
    assert labels(path)["Title"]


def test_training_grids_are_legible_and_labelled(trained):
    images = trained.parent.parent / "images"
    steps = sorted({p.name.rsplit("_step", 1)[1] for p in images.glob("val_samples_t1_step*.png")})
    step = steps[-1].removesuffix(".png")
    samples, recon = images / f"val_samples_t0.8_step{step}.png", images / f"val_reconstructions_step{step}.png"
    assert_legible(samples, rows=2, columns=2)  # n_samples=4: 2 x 2
    assert_legible(recon, rows=5, columns=8)
    title = labels(samples)["Title"]
    assert title.startswith(f"val samples, t=0.8, step {int(step)}, val ") and title.endswith(" bits/dim")
    assert labels(recon)["Description"].endswith("rows: input, k=0, k=1, k=2, k=5 (all)")


def test_overview_is_one_labelled_figure(trained, tmp_path, monkeypatch):
    from vdvae import config

    # Until vdvae.config.SAMPLE_MODES lists the mode (a no-op after).
    monkeypatch.setattr(config, "SAMPLE_MODES", tuple(dict.fromkeys([*config.SAMPLE_MODES, "overview"])))
    (path,) = sample_in_process(tmp_path, f"ckpt_path={trained}", "mode=overview", "n_images=4")
    assert path == tmp_path / "overview.png"
    step = torch.load(trained, weights_only=True)["global_step"]
    text = labels(path)
    assert text["Title"].startswith(f"overview of last.ckpt, step {step}, EMA weights, inputs ")
    assert "samples: rows: t=1, t=0.8, t=0.6, t=0;" in text["Description"]
    assert text["Description"].endswith("rows: input, k=0, k=1, k=2, k=4, k=5 (all)")
    assert_legible(path, rows=4 + 6, columns=4)  # 4 temperatures, the inputs and 5 values of k


def test_a_reconstruction_of_many_images_wraps_into_labelled_blocks(trained, tmp_path):
    from PIL import Image

    (path,) = sample_in_process(tmp_path, f"ckpt_path={trained}", "mode=reconstruct", "n_images=20", "ks=[0,5]")
    rows = "rows: input, k=0, k=5 (all)"
    assert labels(path)["Description"].endswith(f"images 1 to 16 of 20: {rows}; images 17 to 20 of 20: {rows}")
    with Image.open(path) as png:  # 16 columns of 64 px cells (and the labels), not 20; two blocks of 3 rows
        assert 16 * (64 + PAD) <= png.width < 20 * (64 + PAD) and png.height > 6 * (64 + PAD)


@pytest.mark.parametrize("ks, error", [("[0,1,9]", "has 5 latent groups; k=9 is more"), ("[0,-1]", "each 0 or more")])
def test_ks_beyond_the_models_groups_or_negative_is_refused(trained, tmp_path, ks, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        sample_in_process(tmp_path, f"ckpt_path={trained}", "mode=reconstruct", f"ks={ks}")
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow  # the command as typed, in a process of its own
def test_a_terminal_shows_the_progress_of_evaluation(trained, tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, columns
    args = (f"ckpt_path={trained}", "trainer=cpu", "logger=csv")
    proc = start("eval.py", tmp_path, *args, stdout=subprocess.DEVNULL, stderr=stderr)
    os.close(stderr)
    shown, deadline = b"", time.time() + 300
    while time.time() < deadline:
        if not select.select([terminal], [], [], 1)[0]:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the terminal is closed: every writer has ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert proc.wait(timeout=60) == 0
    assert b"evaluating: 100%" in shown and b"297/297" in shown and b"img/s]" in shown
    assert b"Testing" not in shown  # Lightning's own bar is off


def test_a_damaged_or_foreign_latents_file_is_refused_clearly(tmp_path):
    from vdvae.sampling import load_latents, save_latents

    vae = build_model("tiny").eval()
    x, _ = random_batch(vae, n=2)
    good = save_latents(vae, x, tmp_path / "latents.pt", "ckpt")
    assert [z.shape for z in load_latents(vae, good, "cpu")] == [z.shape for z in vae.encode(x)]
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="is not a readable latents file"):
        load_latents(vae, tmp_path / "cut.pt", "cpu")
    torch.save({"other": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="is not a latents file"):
        load_latents(vae, tmp_path / "foreign.pt", "cpu")


@pytest.mark.slow  # the command as typed, in a process of its own
def test_decode_refuses_a_crafted_latents_file_in_one_line_and_leaves_no_run_folder(trained, tmp_path):
    # 5 KB of expanded (stride-0) tensors that declare 20,000 images: refused before any decoding.
    crafted = tmp_path / "crafted.pt"
    shapes = build_model("tiny").latent_shapes  # the trained checkpoint's model
    torch.save({"latents": [torch.zeros(1, *s).expand(20_000, *s) for s in shapes]}, crafted)
    result = run("sample.py", tmp_path, f"ckpt_path={trained}", "mode=decode", f"latents={crafted}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{crafted}: group 0 declares 20000 images" in result.stderr and "Traceback" not in result.stderr
    assert run_dirs(tmp_path, "sample") == []


@pytest.mark.slow  # the command as typed, in a process of its own
def test_generation_needs_no_data(trained, tmp_path):
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["data_config"]["root"] = "/nonexistent"
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    result = run("sample.py", tmp_path, f"ckpt_path={moved}", "mode=samples", "n=4")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # the command as typed, in a process of its own
@pytest.mark.parametrize("script", ["eval.py", "sample.py", "compress.py"])
def test_truncated_or_corrupt_checkpoints_give_a_clear_error(trained, tmp_path, script):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained.read_bytes()[:5000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    # Refused before the run directory exists and before Lightning is imported (python -X importtime).
    result = run(script, tmp_path, f"ckpt_path={truncated}", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode != 0 and f"{truncated} is not a readable checkpoint" in result.stderr, result.stderr[
        -2000:
    ]
    assert run_dirs(tmp_path, script.removesuffix(".py")) == []
    lines = result.stderr.splitlines()
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time")]
    assert "torch" in imported and "lightning" not in imported
    with pytest.raises(CheckpointError, match=f"{garbage} is not a readable checkpoint"):
        load_module(garbage)  # the loader both commands use
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_module(tmp_path / "missing.ckpt")


def reference_overrides(h):
    return [
        "model.vae.image_size=32",
        "model.vae.image_channels=3",
        f"model.vae.width={h['width']}",
        f"model.vae.zdim={h['zdim']}",
        f"model.vae.enc_blocks='{h['enc_blocks']}'",
        f"model.vae.dec_blocks='{h['dec_blocks']}'",
        f"model.vae.num_mixtures={h['num_mixtures']}",
        f"model.vae.custom_widths={repr(h['custom_width']) if h['custom_width'] else 'null'}",
    ]


def import_original(*args):
    """import_original.py in-process: its exit message, or None on success."""
    import import_original as script

    try:
        script.main([str(a) for a in args])
    except SystemExit as error:
        return str(error.code)
    return None


@pytest.mark.parametrize("name", ["tiny", "tiny_custom_width"])
def test_import_reproduces_the_original_figures(tmp_path, name):
    h = EXPECTED["models"][name]
    out = tmp_path / f"{name}.ckpt"
    error = import_original("--preset", "cifar10", "--model", DATA / h["file"], "--out", out, *reference_overrides(h))
    assert error is None, error
    module, checkpoint = load_module(out)  # weights only
    x = torch.load(DATA / "batch.pt", weights_only=True)["x"].permute(0, 3, 1, 2).float()
    for vae in (module.vae, module.ema):
        with torch.no_grad():
            got = vae((x - 120.63838) / 64.16736, (x - 127.5) / 127.5, use_mean=True)
        torch.testing.assert_close(got.loss, torch.tensor(h["elbo"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(got.kl, torch.tensor(h["kl_per_group"]), rtol=1e-4, atol=1e-6)
    assert checkpoint["data_config"]["_target_"].endswith("CIFAR10DataModule")


def test_import_refuses_bad_files_and_writes_nothing(tmp_path):
    h = EXPECTED["models"]["tiny"]
    state = torch.load(DATA / h["file"], weights_only=True)
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "decoder.gain"}, "lacks 1"),
        "extra": ({**state, "decoder.surplus": torch.zeros(1)}, "no counterpart"),
        "shape": ({**state, "decoder.gain": torch.zeros(1, 3, 1, 1)}, "shape (1, 3, 1, 1)"),
        "prefixed": ({f"module.{k}": v for k, v in state.items()}, None),  # multi-GPU saves load as well
    }
    for case, (bad, message) in cases.items():
        torch.save(bad, tmp_path / f"{case}.th")
        out = tmp_path / f"{case}.ckpt"
        error = import_original(
            "--preset", "cifar10", "--model", tmp_path / f"{case}.th", "--out", out, *reference_overrides(h)
        )
        if message is None:
            assert error is None and out.is_file()
        else:
            assert message in error and not out.exists(), error
    (tmp_path / "text.th").write_text("hello")
    error = import_original(
        "--preset", "cifar10", "--model", tmp_path / "text.th", "--out", tmp_path / "t.ckpt", *reference_overrides(h)
    )
    assert "not a readable PyTorch file" in error and not (tmp_path / "t.ckpt").exists()
    error = import_original("--preset", "ffhq1024", "--model", tmp_path / "missing.ckpt", "--out", tmp_path / "f.ckpt")
    assert "openai/vdvae issue #3" in error


def test_notebook_runs(trained):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    os.environ["VDVAE_CKPT"] = str(trained)
    try:
        NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["VDVAE_CKPT"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6
    assert not [o for o in outputs if o.output_type == "error"]


def test_latent_pruning_keeps_its_share_of_the_variates(trained):
    from vdvae.data import data_module_from_config
    from vdvae.tasks.eval import pruned_variates

    module, checkpoint = load_module(trained)
    data = data_module_from_config(checkpoint["data_config"])
    data.setup("test")
    masks = pruned_variates(module, data, 0.25, 200)
    assert sum(int(m.sum()) for m in masks) == 5  # a quarter of 5 groups x 4 variates
    x, target = data.preprocess(torch.stack([data.test_set[i] for i in range(50)]))
    with torch.no_grad():
        pruned = module.ema(x, target, variate_masks=masks)
    assert torch.isfinite(pruned.loss).all()
    assert (pruned.kl > 0).sum(dim=0).tolist() == [50 * bool(m.any()) for m in masks]  # KL only where kept
