"""CIFAR-10 from the python pickles (cifar-10-batches-py): 45,000 train / 5,000 val / 10,000 test."""

import pickle

import numpy as np
import torch

from vdvae.data.base import ImageDataModule, TensorImages, hold_out_as_original, not_found, removing_empty_dirs

_FOLDER = "cifar-10-batches-py"

# What a CIFAR-10 batch pickle may name: numpy's array and dtype reconstructors (numpy 1 and 2 module
# paths), and the bytes constructor that Python 3 writes into protocol-2 pickles.
_ALLOWED_GLOBALS = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a crafted batch file cannot name code to run."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds only arrays and lists")
        return super().find_class(module, name)


def read_cifar_batch(path) -> np.ndarray:
    """One pickled CIFAR batch -> uint8 (N, 3, 32, 32)."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        return data.reshape(-1, 3, 32, 32)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (truncated or corrupt?): {error!r}") from error


class CIFAR10DataModule(ImageDataModule):
    name = "cifar10"

    def __init__(self, download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.download, self.download_error = download, ""

    def _dir(self):
        for d in (self.root / _FOLDER, self.root):
            if (d / "data_batch_1").is_file():
                return d
        return None

    def prepare_data(self):
        if self._dir() is None and self.download:
            import torchvision

            try:
                with removing_empty_dirs(self.root):
                    torchvision.datasets.CIFAR10(str(self.root), download=True)
            except Exception as error:  # no network: load() explains what to do
                self.download_error = f"download failed: {error!r}. "

    def load(self):
        d = self._dir()
        if d is None:
            raise not_found(
                self.name,
                [self.root / _FOLDER / "data_batch_1", self.root / "data_batch_1"],
                self.download_error
                + "run with network access (data.download=true fetches it with torchvision), or extract "
                "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into data.root",
            )
        train = np.concatenate([read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)])
        test = read_cifar_batch(d / "test_batch")
        # The original's validation images (split_seed 11172018 in conf/data/cifar10.yaml)
        train, val = hold_out_as_original(
            TensorImages(torch.from_numpy(train)), self.val_size, self.split_seed, held_out_first=True
        )
        return train, val, TensorImages(torch.from_numpy(test))
