"""MNIST and Fashion-MNIST from their idx files (plain or gzipped); MNIST also dynamically binarized.

Validation holds out `val_size` training images at random; the test set is the official 10,000.
Fashion-MNIST is also found where Debian's `dataset-fashion-mnist` package installs it.
"""

import gzip
from pathlib import Path

import numpy as np
import torch

from vdvae.data.base import ImageDataModule, TensorImages, hold_out, not_found, removing_empty_dirs

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_UBYTE = 0x08


def read_idx_images(path: Path) -> torch.Tensor:
    """An idx3-ubyte image file (optionally .gz) -> uint8 tensor (N, 1, H, W)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError) as error:  # a truncated or damaged .gz
        raise ValueError(f"{path} cannot be read (truncated or corrupt?): {error}") from error
    if len(raw) < 16 or raw[:2] != b"\x00\x00" or raw[2] != _IDX_UBYTE or raw[3] != 3:
        raise ValueError(f"{path} is not an idx3-ubyte image file (bad header)")
    n, h, w = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    if len(raw) != 16 + n * h * w:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw) - 16} bytes of pixels for {n} images of {h}x{w}")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w).copy())


def find_idx(dirs, stem):
    """The first of dir/stem, dir/stem.gz (also under raw/, torchvision's layout) that exists."""
    for d in dirs:
        for sub in ("", "raw"):
            for suffix in ("", ".gz"):
                path = Path(d) / sub / f"{stem}{suffix}"
                if path.is_file():
                    return path
    return None


class MNISTDataModule(ImageDataModule):
    """MNIST-format idx files under `root` (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz])."""

    name = "mnist"
    torchvision_class = "MNIST"
    extra_dirs: tuple = ()

    def __init__(self, download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.download, self.download_error = download, ""

    @property
    def search_dirs(self):
        return [self.root, self.root / self.torchvision_class, *self.extra_dirs]

    def prepare_data(self):
        if find_idx(self.search_dirs, "train-images-idx3-ubyte") or not self.download:
            return
        import torchvision

        try:  # torchvision downloads into root/<Class>/raw
            with removing_empty_dirs(self.root):
                for train in (True, False):
                    getattr(torchvision.datasets, self.torchvision_class)(str(self.root), train=train, download=True)
        except Exception as error:  # no network: fall through to the clear error in load()
            self.download_error = f"download failed: {error!r}. "

    def load(self):
        files = [find_idx(self.search_dirs, f"{s}-images-idx3-ubyte") for s in ("train", "t10k")]
        if None in files:
            raise not_found(
                self.name,
                [f"{d}/[raw/]{{train,t10k}}-images-idx3-ubyte[.gz]" for d in self.search_dirs],
                self.download_error + self.how_to_get,
            )
        train, val = hold_out(TensorImages(read_idx_images(files[0])), self.val_size, self.split_seed)
        return train, val, TensorImages(read_idx_images(files[1]))

    how_to_get = (
        "run with network access (data.download=true fetches it with torchvision), or put the four "
        "idx files from http://yann.lecun.com/exdb/mnist/ in data.root"
    )


class FashionMNISTDataModule(MNISTDataModule):
    name = "fashion_mnist"
    torchvision_class = "FashionMNIST"
    extra_dirs = (DEBIAN_FASHION_MNIST,)
    how_to_get = (
        "on Debian/Ubuntu `sudo apt-get install dataset-fashion-mnist` (installs it under "
        "/usr/share/datasets/fashion-mnist), or run with network access (data.download=true), or put the "
        "idx files from https://github.com/zalandoresearch/fashion-mnist in data.root"
    )
