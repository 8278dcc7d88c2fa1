"""Downsampled ImageNet at 32x32 or 64x64, in any of its three on-disk forms.

Two different datasets go by this name, and their likelihoods are not comparable:
- "van den Oord": the PixelRNN paper's (and VDVAE's) version, as numpy arrays
  `imagenet{R}-train.npy` / `imagenet{R}-valid.npy` (N, R, R, 3) or as PNG folders
  `train_{R}x{R}/` / `valid_{R}x{R}/`;
- "Chrabaszcz downsample": the later box-resized version, as pickled npz batches
  `train_data_batch_*.npz` / `val_data.npz` with flat CHW rows.
The variant in use is logged. Validation holds out `val_size` training images; the test set is
the official validation set.
"""

import logging

import numpy as np
import torch

from vdvae.data.base import ImageDataModule, TensorImages, hold_out_as_original, not_found
from vdvae.data.folder import FolderImages, image_files

log = logging.getLogger(__name__)


def read_npz_batches(files, size: int) -> np.ndarray:
    arrays = []
    for f in files:
        try:
            with np.load(f) as batch:
                arrays.append(batch["data"].reshape(-1, 3, size, size))
        except (ValueError, KeyError, OSError, EOFError) as error:
            raise ValueError(
                f"{f} is not a downsampled-ImageNet npz batch (truncated or corrupt?): {error!r}"
            ) from error
    return np.concatenate(arrays)


class ImageNetDataModule(ImageDataModule):
    name = "imagenet"

    def load(self):
        r = self.image_size
        npy = [self.root / f"imagenet{r}-train.npy", self.root / f"imagenet{r}-valid.npy"]
        folders = [self.root / f"train_{r}x{r}", self.root / f"valid_{r}x{r}"]
        npz_train = sorted(self.root.glob("train_data_batch_*.npz"))
        if all(p.is_file() for p in npy):
            self.variant = "van den Oord (PixelRNN/VDVAE), npy"
            train, test = (TensorImages(self._load_npy(p), channels_last=True) for p in npy)
        elif all(p.is_dir() for p in folders):
            self.variant = "van den Oord (PixelRNN/VDVAE), png folders"
            train, test = (FolderImages(image_files(p), r, 3) for p in folders)
        elif npz_train and (self.root / "val_data.npz").is_file():
            self.variant = "Chrabaszcz et al. downsample, npz (not comparable with the paper's figures)"
            train = TensorImages(torch.from_numpy(read_npz_batches(npz_train, r)))
            test = TensorImages(torch.from_numpy(read_npz_batches([self.root / "val_data.npz"], r)))
        else:
            raise not_found(
                f"imagenet{r}",
                [*npy, *folders, self.root / "train_data_batch_*.npz + val_data.npz"],
                "download the downsampled ImageNet (van den Oord variant, as in the paper) and put "
                "its arrays or folders in data.root",
            )
        log.info("imagenet%d variant: %s", r, self.variant)
        self.name = f"imagenet{r} [{self.variant}]"
        train, val = hold_out_as_original(train, self.val_size, self.split_seed)  # the original's split
        return train, val, test

    @staticmethod
    def _load_npy(path):
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as error:
            raise ValueError(f"{path} is not a numpy array file (truncated or corrupt?): {error!r}") from error
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"{path}: expected uint8 (N, H, W, 3), got {array.dtype} {array.shape}")
        return array
