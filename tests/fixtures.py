"""Small datasets in the real on-disk formats: CIFAR-10 pickles, MNIST idx, ImageNet npy/npz/png, FFHQ."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def rng(seed=0):
    return np.random.default_rng(seed)


def make_cifar10(root: Path, per_batch=12, n_test=10) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        data = rng(len(name)).integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            # protocol 2, as the real files (written by Python 2's cPickle)
            pickle.dump({b"data": data, b"labels": [0] * n, b"batch_label": name.encode()}, f, protocol=2)
    return root


def write_idx(path: Path, images: np.ndarray, gz: bool):
    raw = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", *images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_mnist(root: Path, n_train=40, n_test=10, gz=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", rng(1).integers(0, 256, (n_train, 28, 28), dtype=np.uint8), gz)
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", rng(2).integers(0, 256, (n_test, 28, 28), dtype=np.uint8), gz)
    return root


def write_pngs(folder: Path, n: int, size: int, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def make_imagenet(root: Path, form: str, size=32, n_train=20, n_test=6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if form == "npy":
        np.save(root / f"imagenet{size}-train.npy", rng(3).integers(0, 256, (n_train, size, size, 3), dtype=np.uint8))
        np.save(root / f"imagenet{size}-valid.npy", rng(4).integers(0, 256, (n_test, size, size, 3), dtype=np.uint8))
    elif form == "npz":
        for i in (1, 2):
            data = rng(i).integers(0, 256, (n_train // 2, 3 * size * size), dtype=np.uint8)
            np.savez(root / f"train_data_batch_{i}.npz", data=data, labels=np.zeros(n_train // 2))
        np.savez(
            root / "val_data.npz",
            data=rng(9).integers(0, 256, (n_test, 3 * size * size), dtype=np.uint8),
            labels=np.zeros(n_test),
        )
    else:
        write_pngs(root / f"train_{size}x{size}", n_train, size)
        write_pngs(root / f"valid_{size}x{size}", n_test, size, seed=100)
    return root
