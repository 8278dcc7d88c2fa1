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
