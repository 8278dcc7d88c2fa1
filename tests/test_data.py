"""Data modules against fixtures in the real on-disk formats: splits, shapes, preprocessing, errors."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_cifar10, make_imagenet, make_mnist, write_pngs
from vdvae.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    FFHQ256DataModule,
    FFHQ1024DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    Preprocess,
)
from vdvae.data.base import ShardSampler

COMMON = dict(batch_size=4, eval_batch_size=3, val_size=5)


def loaded(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cifar10_pickles(tmp_path):
    dm = loaded(
        CIFAR10DataModule(root=str(make_cifar10(tmp_path)), image_size=32, channels=3, download=False, **COMMON)
    )
    assert [len(s) for s in dm.splits] == [55, 5, 10]
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    dm = loaded(
        MNISTDataModule(
            root=str(make_mnist(tmp_path / "m", gz=gz)), image_size=28, channels=1, download=False, **COMMON
        )
    )
    assert [len(s) for s in dm.splits] == [35, 5, 10]
    # torchvision's layout (root/MNIST/raw) is found too
    make_mnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    dm = loaded(FashionMNISTDataModule(root=str(tmp_path / "tv"), image_size=28, channels=1, download=False, **COMMON))
    assert len(dm.test_set) == 10


@pytest.mark.parametrize("form,variant", [("npy", "van den Oord"), ("npz", "Chrabaszcz"), ("png", "van den Oord")])
def test_imagenet_forms_name_their_variant(tmp_path, form, variant):
    dm = loaded(ImageNetDataModule(root=str(make_imagenet(tmp_path, form)), image_size=32, channels=3, **COMMON))
    assert variant in dm.variant and variant in dm.name
    assert [len(s) for s in dm.splits] == [15, 5, 6]
    assert dm.train_set[0].shape == (3, 32, 32) and dm.test_set[0].dtype == torch.uint8


def test_npz_rows_are_planar_rgb(tmp_path):
    make_imagenet(tmp_path, "npz", n_train=4, n_test=2)
    dm = loaded(ImageNetDataModule(root=str(tmp_path), image_size=32, channels=3, batch_size=1, val_size=1))
    row = np.load(tmp_path / "val_data.npz")["data"][0]
    assert torch.equal(dm.test_set[0], torch.from_numpy(row.reshape(3, 32, 32)))


def test_image_folder_resizes_and_splits(tmp_path):
    write_pngs(tmp_path / "imgs" / "train", 12, 40)
    write_pngs(tmp_path / "imgs" / "test", 3, 24)
    dm = loaded(ImageFolderDataModule(root=str(tmp_path / "imgs"), image_size=16, channels=3, **COMMON))
    assert [len(s) for s in dm.splits] == [7, 5, 3]
    assert dm.val_set[0].shape == (3, 16, 16) and dm.test_set[0].shape == (3, 16, 16)
    gray = loaded(ImageFolderDataModule(root=str(tmp_path / "imgs"), image_size=16, channels=1, **COMMON))
    assert gray.train_set[0].shape == (1, 16, 16)


def test_ffhq_forms(tmp_path):
    np.save(tmp_path / "ffhq-256.npy", np.zeros((12, 256, 256, 3), np.uint8))
    dm = loaded(FFHQ256DataModule(root=str(tmp_path), image_size=256, channels=3, bits=5, **COMMON))
    assert [len(s) for s in dm.splits] == [7, 5, 5] and dm.val_set is dm.test_set
    write_pngs(tmp_path / "f1024" / "train", 2, 1024)
    write_pngs(tmp_path / "f1024" / "valid", 1, 1024)
    dm = loaded(FFHQ1024DataModule(root=str(tmp_path / "f1024"), image_size=1024, channels=3, batch_size=1))
    assert [len(s) for s in dm.splits] == [2, 1, 1] and dm.train_set[0].shape == (3, 1024, 1024)


def test_digits():
    dm = loaded(DigitsDataModule(root=".", image_size=8, channels=1, batch_size=8, val_size=200))
    assert [len(s) for s in dm.splits] == [1300, 200, 297]
    assert dm.train_set[0].max() <= 255


@pytest.mark.parametrize(
    "module,kwargs",
    [
        (CIFAR10DataModule, dict(image_size=32, channels=3, download=False)),
        (MNISTDataModule, dict(image_size=28, channels=1, download=False)),
        (ImageNetDataModule, dict(image_size=64, channels=3)),
        (FFHQ256DataModule, dict(image_size=256, channels=3)),
        (FFHQ1024DataModule, dict(image_size=1024, channels=3)),
        (ImageFolderDataModule, dict(image_size=32, channels=3)),
    ],
)
def test_missing_data_names_the_paths_and_the_remedy(tmp_path, module, kwargs):
    with pytest.raises(DataNotFoundError, match="no data found. Searched:") as error:
        loaded(module(root=str(tmp_path / "nowhere"), **kwargs, **COMMON))
    assert str(tmp_path / "nowhere") in str(error.value) and "To get it:" in str(error.value)


def test_corrupt_files_fail_with_a_clear_error(tmp_path):
    make_cifar10(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 python batch"):
        loaded(CIFAR10DataModule(root=str(tmp_path / "c"), image_size=32, channels=3, download=False, **COMMON))
    make_mnist(tmp_path / "m", gz=False)
    path = tmp_path / "m" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        loaded(MNISTDataModule(root=str(tmp_path / "m"), image_size=28, channels=1, download=False, **COMMON))
    write_pngs(tmp_path / "f", 6, 8)
    (tmp_path / "f" / "00000.png").write_bytes(b"not a png")
    (tmp_path / "f" / "00005.png").write_bytes(b"")  # the last file too: every file is checked at set-up
    with pytest.raises(ValueError, match="2 of 6 image files cannot be read") as error:
        loaded(ImageFolderDataModule(root=str(tmp_path / "f"), image_size=8, channels=3, batch_size=2, val_size=2))
    assert "00000.png" in str(error.value) and "00005.png" in str(error.value)


def test_shape_mismatch_is_reported(tmp_path):
    with pytest.raises(ValueError, match="data.image_size=32"):
        loaded(MNISTDataModule(root=str(make_mnist(tmp_path)), image_size=32, channels=1, download=False, **COMMON))


def test_preprocess_targets_lie_on_the_bit_grid():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    inputs, target = Preprocess(shift=-127.5, scale=1 / 127.5, bits=5)(x)
    k = (target + 1) / 2 * 31
    torch.testing.assert_close(k, k.round())
    assert target.min() == -1 and target.max() == 1 and len(target.unique()) == 32
    torch.testing.assert_close(inputs, target)  # with this shift/scale, inputs are the grid values too
    _, binary = Preprocess(binarize=True)(torch.full((1, 1, 100, 100), 64, dtype=torch.uint8))
    assert set(binary.unique().tolist()) == {0.0, 1.0} and abs(binary.mean().item() - 64 / 255) < 0.02


def test_shards_cover_every_index_once():
    for n, world in [(297, 2), (10, 3), (5, 8)]:
        seen = sorted(i for r in range(world) for i in ShardSampler(n, r, world))
        assert seen == list(range(n))


def test_splits_as_the_original_code_makes_them():
    from sklearn.model_selection import train_test_split

    from vdvae.data.base import hold_out_as_original

    images = torch.utils.data.TensorDataset(torch.arange(600))
    # CIFAR-10: scikit-learn's train_test_split(test_size=5000, random_state=11172018), here at 600 images.
    train, val = hold_out_as_original(images, 50, 11172018, held_out_first=True)
    sk_train, sk_val = train_test_split(np.arange(600), test_size=50, random_state=11172018)
    assert train.indices == sk_train.tolist() and val.indices == sk_val.tolist()
    # ImageNet (seed 42) and FFHQ-256 (seed 5): np.random.seed(s); the last n of np.random.permutation.
    np.random.seed(5)
    order = np.random.permutation(600)
    train, val = hold_out_as_original(images, 70, 5)
    assert val.indices == order[-70:].tolist() and train.indices == order[:-70].tolist()


def test_original_low_bit_preprocessing_is_the_original_codes():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    inputs, target = Preprocess(shift=-112.8666757481, scale=1 / 69.84780273, bits=5, original_low_bit=True)(x)
    expected = [(v // 8) * 8 / 127.5 - 1 for v in range(256)]  # floor(x / 8) * 8 on [-1, 1]
    torch.testing.assert_close(target.flatten(), torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs.flatten(), (torch.arange(256.0) - 112.8666757481) / 69.84780273)


def test_a_failed_download_leaves_no_empty_folders(tmp_path):
    from vdvae.data.base import removing_empty_dirs

    (tmp_path / "data" / "kept").mkdir(parents=True)
    with pytest.raises(OSError, match="no network"):
        with removing_empty_dirs(tmp_path / "data" / "cifar10" / "x"):
            (tmp_path / "data" / "cifar10" / "x" / "raw").mkdir(parents=True)
            raise OSError("no network")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["kept"]


def test_a_truncated_gz_names_its_file(tmp_path):
    from vdvae.data.mnist import read_idx_images

    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz cannot be read"):
        read_idx_images(path)


def write_png16(path, values: np.ndarray):
    """A 16-bit PNG of uint16 `values` (H, W, C): C = 2, 3 or 4 for grey-alpha, RGB or RGBA, which Pillow reads
    but cannot write."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, c = values.shape
    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def as_grey(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))  # the documented rule: Pillow's luma


def test_16_bit_grey_folders_keep_the_high_byte_and_say_so_once(tmp_path, caplog):
    from PIL import Image

    values = (np.arange(64).reshape(8, 8) * 1040 + 7).astype(np.uint16)  # 7 ... 65527
    values[0, :3] = [0, 256, 65535]
    for split, n in [("train", 3), ("valid", 1), ("test", 1)]:
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.fromarray(values).save(tmp_path / split / f"{i}.png")
    assert Image.open(tmp_path / "test" / "0.png").mode == "I;16"
    with caplog.at_level("WARNING", logger="vdvae.data.folder"):
        grey = loaded(ImageFolderDataModule(root=str(tmp_path), image_size=8, channels=1, batch_size=2, val_size=1))
        grey.setup("test")
        rgb = loaded(ImageFolderDataModule(root=str(tmp_path), image_size=8, channels=3, batch_size=2, val_size=1))
    assert torch.equal(grey.train_set[0][0], torch.from_numpy((values >> 8).astype(np.uint8)))
    assert grey.test_set[0][0, 0, :3].tolist() == [0, 1, 255]  # Pillow's own conversion: [0, 255, 255]
    assert torch.equal(rgb.val_set[0], grey.val_set[0].expand(3, 8, 8))
    said = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(said) == 2, said  # one per data module, for all its splits and set-ups
    assert "5 of 5 images are converted to 8-bit grey" in said[0] and "I;16 (5 files): 16-bit values" in said[0]
    assert ">> 8" in said[0] and "grey copied to R, G and B" in said[1]


def cmyk_jpeg(path):
    from PIL import Image

    cmyk = np.stack(np.meshgrid(np.arange(0, 256, 32), np.arange(0, 256, 32)) * 2, axis=-1).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(path, quality=100)
    c, m, y, k = np.asarray(Image.open(path)).astype(np.int64).transpose(2, 0, 1)  # as decoded (JPEG is lossy)
    return np.rint(np.stack([255 - c, 255 - m, 255 - y], -1) * (255 - k)[..., None] / 255).astype(np.uint8)


def mode_cases():
    """name -> (write(path) -> the RGB or grey pixels the docs say it gives, file suffix)."""
    from PIL import Image

    gen = np.random.default_rng(0)
    rgba = gen.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a transparent pixel keeps its stored colour
    grey_alpha = gen.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    palette = gen.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = gen.integers(0, 16, (8, 8), dtype=np.uint8)
    wide = gen.integers(0, 65536, (8, 8, 3), dtype=np.uint16)

    def paletted(path):
        image = Image.fromarray(indices, "P")
        image.putpalette(palette.tobytes())
        image.save(path, transparency=3)
        return palette[indices]

    return {
        "1": (lambda p: Image.fromarray(indices > 7).save(p) or (indices > 7).astype(np.uint8) * 255, "png"),
        "LA": (lambda p: Image.fromarray(grey_alpha, "LA").save(p) or grey_alpha[..., 0], "png"),
        "RGBA": (lambda p: Image.fromarray(rgba, "RGBA").save(p) or rgba[..., :3], "png"),
        "P": (paletted, "png"),
        "CMYK": (cmyk_jpeg, "jpg"),
        "RGB;16": (lambda p: write_png16(p, wide) or (wide >> 8).astype(np.uint8), "png"),
        "LA;16": (lambda p: write_png16(p, wide[..., :2]) or (wide[..., 0] >> 8).astype(np.uint8), "png"),
    }


@pytest.mark.parametrize("mode", list(mode_cases()))
def test_every_image_mode_is_read_as_the_docs_say(tmp_path, caplog, mode):
    from vdvae.data.folder import checked_images

    write, suffix = mode_cases()[mode]
    expected = write(tmp_path / f"image.{suffix}")
    rgb = expected if expected.ndim == 3 else np.repeat(expected[..., None], 3, -1)
    grey = expected if expected.ndim == 2 else as_grey(expected)
    with caplog.at_level("WARNING", logger="vdvae.data.folder"):
        as_rgb = checked_images([tmp_path / f"image.{suffix}"], 8, 3, "inputs")[0]
        as_grey_ = checked_images([tmp_path / f"image.{suffix}"], 8, 1, "inputs")[0]
    assert np.array_equal(as_rgb.permute(1, 2, 0).numpy(), rgb)
    assert np.array_equal(as_grey_[0].numpy(), grey)
    assert caplog.text.count(f" {mode} (1 file): ") == 2, caplog.text


def test_images_of_other_modes_are_refused_at_set_up(tmp_path):
    from PIL import Image

    from vdvae.data.folder import UnsupportedImage, pixels

    write_pngs(tmp_path / "f", 3, 8)
    Image.new("F", (8, 8), 0.5).save(tmp_path / "f" / "float.png", format="TIFF")  # Pillow goes by the content
    with pytest.raises(ValueError, match="1 of 4 image files cannot be read") as error:
        loaded(ImageFolderDataModule(root=str(tmp_path / "f"), image_size=8, channels=3, batch_size=2, val_size=1))
    assert "float.png (mode F: not read; convert it to 8-bit RGB or grey)" in str(error.value)
    with pytest.raises(UnsupportedImage, match="values outside 0..65535"):
        pixels(Image.new("I", (2, 2), 70000), "L", "big.png")
    assert pixels(Image.new("I", (2, 2), 65535), "L", "ok.png").tolist() == [[255, 255], [255, 255]]


def test_image_files_that_would_hang_or_cost_more_than_they_hold_are_refused_at_set_up(tmp_path):
    import os
    import zlib

    from PIL import Image

    folder = tmp_path / "f"
    write_pngs(folder, 4, 8)
    os.mkfifo(folder / "pipe.png")  # opened, it would block the run for ever
    # 1 x 20,000,000 pixels in 20 KB: resized to 8 pixels high it would be 160 million wide.
    row = zlib.compress(b"\0" * (20_000_001), 9)
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", (20_000_000).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x08\x00\x00\x00\x00"
    )
    (folder / "wide.png").write_bytes(header + _png_chunk(b"IDAT", row) + _png_chunk(b"IEND", b""))
    full = (folder / "00000.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) - 20])
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="4 of 8 image files cannot be read") as error:
        loaded(ImageFolderDataModule(root=str(folder), image_size=8, channels=3, batch_size=2, val_size=1))
    said = str(error.value)
    for line in (
        "pipe.png (not a regular file",
        "wide.png (20000000x1 pixels",
        "truncated.png (truncated",
        "animated.png (animated, 2 frames",
    ):
        assert line in said, said


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


# --- Batch sizes against the splits, a checkpoint's stored data values, and data=<name> for every command ---

DIGITS = dict(_target_="vdvae.data.DigitsDataModule", root=".", image_size=8, channels=1, batch_size=8, val_size=200)


def test_a_training_batch_larger_than_the_training_split_is_refused_at_set_up():
    from types import SimpleNamespace

    dm = DigitsDataModule(root=".", image_size=8, channels=1, batch_size=5000, val_size=200)
    with pytest.raises(ValueError, match=r"^data.batch_size=5000 asks for 5000 training images per update, but "):
        dm.setup("fit")
    with pytest.raises(ValueError, match="training split of digits has 1300: use data.batch_size=1300 or less$"):
        dm.setup()  # every stage
    dm.setup("test")  # evaluation draws no training batch
    assert len(dm.test_set) == 297
    limited = DigitsDataModule(root=".", image_size=8, channels=1, batch_size=32, val_size=200, limit_train=10)
    with pytest.raises(ValueError, match=r"has 10 \(data.limit_train=10\): use data.batch_size=10 or less, or raise"):
        limited.setup("fit")
    accumulated = DigitsDataModule(root=".", image_size=8, channels=1, batch_size=2 * 700, val_size=200)
    accumulated.batches_per_update = 2  # as the training task makes it for trainer.accumulate_grad_batches=2
    with pytest.raises(ValueError, match=r"data.batch_size=700 x trainer.accumulate_grad_batches=2 asks for 1400 "):
        accumulated.setup("fit")
    with pytest.raises(ValueError, match="use data.batch_size=650 or less"):
        accumulated.setup("fit")
    shared = DigitsDataModule(root=".", image_size=8, channels=1, batch_size=700, val_size=200)
    shared.trainer = SimpleNamespace(global_rank=0, world_size=2)  # each of 2 devices takes half the split
    with pytest.raises(ValueError, match=r"data.batch_size=700 x 2 devices asks for 1400 .* data.batch_size=650 or"):
        shared.setup("fit")
    fits = loaded(DigitsDataModule(root=".", image_size=8, channels=1, batch_size=1300, val_size=200))
    assert [len(batch) for batch in fits.train_dataloader()] == [1300]


def test_evaluation_batches_larger_than_a_split_become_one_batch_with_a_warning(caplog):
    import logging

    dm = DigitsDataModule(root=".", image_size=8, channels=1, batch_size=8, eval_batch_size=250, val_size=200)
    with caplog.at_level(logging.WARNING, logger="vdvae.data.base"):
        dm.setup("fit")
        dm.setup("fit")  # Lightning sets up again: one warning
        dm.setup("test")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "digits: evaluation batches of 250 images (data.eval_batch_size, or eval.py's batch_size) are more than "
        "the 200 validation images: evaluating them in one batch of 200"
    ]  # the 297 test images take batches of 250
    assert [len(batch) for batch in dm.val_dataloader()] == [200]
    assert [len(batch) for batch in dm.test_dataloader()] == [250, 47]
    dm.eval_batch_size = 5000
    with caplog.at_level(logging.WARNING, logger="vdvae.data.base"):
        dm.setup("test")
    assert "more than the 297 test images: evaluating them in one batch of 297" in caplog.text
    assert [len(batch) for batch in dm.test_dataloader()] == [297]


def test_a_stored_num_workers_above_the_cores_is_lowered_with_a_warning(monkeypatch, caplog):
    import logging
    import os

    from vdvae.data import data_module_from_config

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="vdvae.data"):
        dm = data_module_from_config({**DIGITS, "num_workers": 12})
    assert dm.num_workers == 2
    assert "the stored data config asks for num_workers=12, more than this machine's 2 cores: using 2" in caplog.text
    caplog.clear()
    assert data_module_from_config({**DIGITS, "num_workers": 2}).num_workers == 2 and not caplog.records
    assert data_module_from_config({**DIGITS, "num_workers": 12}, num_workers=0).num_workers == 0  # the user's


@pytest.mark.parametrize(
    "key, value, wanted",
    [
        ("num_workers", -1, "an integer >= 0"),
        ("num_workers", 2.0, "an integer >= 0"),
        ("num_workers", True, "an integer >= 0"),
        ("num_workers", None, "an integer >= 0"),
        ("batch_size", 0, "an integer >= 1"),
        ("batch_size", "8", "an integer >= 1"),
        ("eval_batch_size", -5, r"an integer >= 1 \(or null\)"),
        ("limit_train", 0, r"an integer >= 1 \(or null\)"),
        ("image_size", 0, "an integer >= 1"),
        ("bits", 9, "an integer >= 1 and <= 8"),
        ("val_size", -1, "an integer >= 0"),
        ("seed", 0.5, "an integer;"),
        ("shift", float("nan"), "a finite number;"),
        ("scale", 0.0, "a finite number other than 0"),
        ("scale", float("inf"), "a finite number"),
        ("random_flip", 1, "true or false"),
        ("binarize", "false", "true or false"),
    ],
)
def test_stored_data_values_out_of_range_are_refused_with_the_remedy(key, value, wanted):
    import re

    from vdvae.data import check_stored_data_config, data_module_from_config

    pattern = rf"^the stored data config's {key}={re.escape(repr(value))} is not valid: it must be {wanted}"
    with pytest.raises(ValueError, match=pattern) as error:
        check_stored_data_config({**DIGITS, key: value})
    assert str(error.value).endswith("pass data=<name> to use a data config of your own instead")
    with pytest.raises(ValueError, match=pattern):
        data_module_from_config({**DIGITS, key: value})


def test_a_checkpoint_with_a_bad_stored_value_is_refused_before_anything_runs(tmp_path):
    from vdvae.checkpoints import CheckpointError, check_checkpoint

    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "data_config": {**DIGITS, "num_workers": -1}}, path)
    with pytest.raises(CheckpointError, match=r"bad.ckpt: the stored data config's num_workers=-1 is not valid"):
        check_checkpoint(path, stored_data=True)


@pytest.mark.parametrize("command", ["compress", "eval", "sample"])
def test_every_data_option_composes_and_resolves_for_every_checkpoint_command(command):
    from omegaconf import OmegaConf

    from tests.conftest import CONF, compose_config

    for name in sorted(p.stem for p in (CONF / "data").glob("*.yaml")):
        cfg = compose_config(f"data={name}", "ckpt_path=model.ckpt", config_name=command)
        data = OmegaConf.to_container(cfg.data, resolve=True)
        assert data["seed"] == cfg.seed == 0 and "${" not in str(data), (command, name)
