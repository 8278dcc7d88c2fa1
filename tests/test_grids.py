"""Labelled grids (vdvae.grids: small images scaled up by a whole factor, large ones kept, labels in the image
and in the PNG's text) and progress bars (vdvae.progress: on a terminal only). The commands' grids and
their stderr: test_eval_sample.py."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae import grids
from vdvae.progress import ProgressLines, progress
from vdvae.sampling import sample_images, save_grid


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def test_small_images_are_scaled_by_a_whole_factor_and_large_ones_kept():
    assert [grids.scale_factor(s) for s in (8, 28, 32, 64, 256)] == [8, 3, 2, 1, 1]
    image = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)
    assert torch.equal(grids.enlarge(image, 3)[0, ::3, ::3], image[0])  # nearest neighbour: pixels stay pixels
    assert grids.enlarge(image, 3)[0, :3, :3].unique().tolist() == [0]


def test_a_grid_of_8_px_images_is_legible_and_labelled(tmp_path):
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    path = save_grid(images, tmp_path / "grid.png", 4, ["samples", "t=0.8", "step 12"], ["t=1", "t=0.8"])
    with Image.open(path) as png:
        width, height, array = png.width, png.height, np.asarray(png.convert("L"))
    cell = 64 + grids.PAD
    assert width >= 4 * cell and height > 2 * cell  # 4 columns of 64 px, and a title band above 2 rows
    band = array[: height - 2 * cell - grids.PAD]
    assert band.min() < 128  # the title is drawn: dark text on white
    assert grids.labels(path) == {
        "Title": "samples, t=0.8, step 12",
        "Description": "samples, t=0.8, step 12; rows: t=1, t=0.8",
    }
    assert array[-cell // 2, : width - 4 * cell].min() < 128  # the last row's label, left of the images
    assert not [p for p in tmp_path.iterdir() if p.name != "grid.png"]  # written through a temporary name


def test_large_images_keep_their_size_and_a_long_title_wraps(tmp_path):
    images = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    title = ["a title", "longer than two images are wide " * 3, "step 5"]
    image = grids.render([grids.Part(images, 2)], title)
    assert image.mode == "RGB" and image.width == 2 * 256 + 3 * grids.PAD  # not scaled, columns kept
    one_line = grids.render([grids.Part(images, 2)], ["a title"])
    assert image.height > one_line.height > 256  # the title took more lines, not more width


def test_a_figure_of_parts_labels_each_part(tmp_path):
    samples = grids.Part(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), 3, "samples", ["t=1", "t=0"])
    recon = grids.Part(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), 3, "reconstructions", ["input", "k=1 (all)"])
    path = grids.save_figure(tmp_path / "figure.png", [samples, recon], ["overview", "step 3"])
    text = grids.labels(path)["Description"]
    assert text == "overview, step 3; samples: rows: t=1, t=0; reconstructions: rows: input, k=1 (all)"
    with Image.open(path) as png:
        assert png.height > 4 * (64 + grids.PAD)


def test_a_bar_is_drawn_only_on_a_terminal(monkeypatch):
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    with progress(10, "sampling") as bar:
        assert isinstance(bar, ProgressLines)  # a line through the log now and then, never a bar
        bar.update(10)
    assert quiet.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with progress(10, "sampling") as bar:
        assert not isinstance(bar, ProgressLines)
        bar.update(10)
    shown = terminal.getvalue()
    assert "sampling" in shown and "10/10" in shown and "img/s" in shown


@pytest.mark.parametrize("tty", [False, True])
def test_sampling_advances_the_bar_per_batch(tiny, monkeypatch, tty):
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    with progress(5, "sampling") as bar:
        images = sample_images(tiny.eval(), 5, 1.0, batch_size=2, bar=bar)
        assert images.shape == (5, 1, 8, 8)
    assert ("5/5" in stderr.getvalue()) == tty


def test_the_loggers_get_the_labels(tmp_path, monkeypatch):
    """W&B gets the caption with the image; TensorBoard the image under its tag and the caption as text."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from vdvae.callbacks import log_image

    path = save_grid(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), tmp_path / "grid.png", 2, ["val samples"])
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    logged, written = [], []
    monkeypatch.setattr(wandb_logger, "log_metrics", lambda metrics, step: logged.append((metrics, step)))
    board = SimpleNamespace(
        add_image=lambda tag, array, step, dataformats: written.append((tag, array.shape, step)),
        add_text=lambda tag, text, step: written.append((tag, text, step)),
    )
    monkeypatch.setattr(TensorBoardLogger, "experiment", property(lambda self: board))
    trainer = SimpleNamespace(loggers=[wandb_logger, TensorBoardLogger(str(tmp_path))], global_step=7)
    log_image(trainer, "val/samples_t1", path, "val samples, t=1, step 7")
    ((metrics, step),) = logged
    assert step == 7 and [image._caption for image in metrics["val/samples_t1"]] == ["val samples, t=1, step 7"]
    with Image.open(path) as png:
        shape = (png.height, png.width, 3)
    assert written == [("val/samples_t1", shape, 7), ("val/samples_t1/caption", "val samples, t=1, step 7", 7)]
    log_image(trainer, "val/other", path)  # no caption: none sent
    assert len(logged) == 2 and len(written) == 3


def test_many_images_without_row_labels_wrap_into_rows_of_at_most_16(tmp_path):
    images = torch.zeros(1000, 1, 8, 8, dtype=torch.uint8)
    one_row = Image.open(save_grid(images[:16], tmp_path / "row.png", 16))
    wrapped = Image.open(save_grid(images, tmp_path / "many.png", len(images)))  # as decode asks: one row
    assert wrapped.width == one_row.width and wrapped.height > 60 * 64
    labelled = Image.open(save_grid(images[:40], tmp_path / "labelled.png", 20, rows=["a", "b"]))
    assert labelled.width > one_row.width  # labelled rows keep their columns


def test_summary_cells_stay_in_their_cells_and_never_run_as_formulas(tmp_path):
    import csv
    import re

    from vdvae.sweeps import write_summary

    records = [
        {
            "job": "0",
            "overrides": ["a=x|y", "b=1\n| forged | row |"],
            "status": "crashed",
            "error": "=cmd|' /C calc'!A0",
        },
        {"job": "1", "overrides": ["a=2", "b=2"], "status": "completed", "objective": -1.5},
    ]
    text = write_summary(tmp_path, records).read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(len(re.findall(r"(?<!\\)\|", line)) == 8 for line in table), text
    with open(tmp_path / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert rows[0]["error"] == "'=cmd|' /C calc'!A0" and rows[1]["objective"] == "-1.5"


def test_a_refusal_quoting_a_megabyte_prints_one_bounded_line(capsys):
    from vdvae.errors import refuse

    with pytest.raises(SystemExit):
        refuse(ValueError("field: " + "x" * 1_000_000))
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and len(said) < 2100 and "(1,000,007 characters)" in said
