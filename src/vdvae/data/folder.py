"""Image folders: a generic one for custom data (any resolution), FFHQ-256 and FFHQ-1024.

A folder dataset reads every image file under a directory (recursively), converts it to RGB or
grayscale, and resizes (shorter side) and centre-crops it to `image_size`. Splits come from
`train/`, `valid/` (or `val/`) and `test/` subfolders where they exist; otherwise validation and
test images are held out of the training images at random.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vdvae.data.base import ImageDataModule, TensorImages, hold_out, hold_out_as_original, not_found

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def input_files(paths) -> list[Path]:
    """The files of an `inputs=[...]` option: image files as given, folders as every image under them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += image_files(p)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"inputs: {p} does not exist")
    if not files:
        raise FileNotFoundError(f"inputs: no images found in {[str(p) for p in paths]}")
    return files


def check_headers(files: list[Path], shown: int = 5):
    """Every file must open as an image (its header is read, not the pixels): a bad file stops the run at
    setup, named, instead of mid-epoch."""
    bad = []
    for path in files:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as error:
            bad.append(f"{path} ({type(error).__name__})")
    if bad:
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        raise ValueError(
            f"{len(bad)} of {len(files)} image files cannot be read (corrupt or not images); remove or replace "
            f"them:\n  " + "\n  ".join(bad[:shown]) + more
        )


class FolderImages(torch.utils.data.Dataset):
    """Image files decoded on access to uint8 (C, image_size, image_size)."""

    def __init__(self, files, image_size: int, channels: int):
        self.files, self.image_size = list(files), image_size
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as file:
                array = np.asarray(file.convert(self.mode))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot decode image {path} (corrupt or not an image): {error}") from error
        image = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = TF.center_crop(TF.resize(image, self.image_size, antialias=True), self.image_size)
        return image

    def subset(self, indices):
        return FolderImages([self.files[i] for i in indices], self.image_size, 3 if self.mode == "RGB" else 1)


class ImageFolderDataModule(ImageDataModule):
    """Custom data: `root` holds image files, or train/ and optionally valid/ (val/) and test/ subfolders."""

    name = "image_folder"

    def __init__(self, test_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.test_size = test_size

    def _split_dir(self, *names):
        return next((self.root / n for n in names if (self.root / n).is_dir()), None)

    def _dataset(self, directory):
        files = image_files(directory)
        if not files:
            raise not_found(self.name, [f"{directory}/**/*{{{','.join(sorted(IMAGE_SUFFIXES))}}}"], self.how_to_get)
        check_headers(files)
        return FolderImages(files, self.image_size, self.channels)

    how_to_get = "point data.root at a folder of images (or one with train/, valid/ and test/ subfolders)"

    def load(self):
        if not self.root.is_dir():
            raise not_found(self.name, [self.root], self.how_to_get)
        train_dir = self._split_dir("train") or self.root
        train = self._dataset(train_dir)
        val_dir, test_dir = self._split_dir("valid", "val"), self._split_dir("test")
        test = self._dataset(test_dir) if test_dir else None
        if test is None and self.test_size:
            train, test = hold_out(train, self.test_size, self.split_seed + 1)
        val = self._dataset(val_dir) if val_dir else None
        if val is None:
            train, val = hold_out(train, self.val_size, self.split_seed)
        return train, val, test if test is not None else val


class FFHQ256DataModule(ImageFolderDataModule):
    """FFHQ at 256x256: the original's `ffhq-256.npy` array (N, 256, 256, 3) or an image folder.

    7,000 images are held out as in the original (split_seed 5 in the paper preset) and serve as both the
    validation and the test set, as in the paper.
    """

    name = "ffhq256"
    how_to_get = (
        "put ffhq-256.npy (uint8, N x 256 x 256 x 3) or a folder of the FFHQ images in data.root; "
        "see https://github.com/NVlabs/ffhq-dataset"
    )

    def load(self):
        npy = self.root / "ffhq-256.npy"
        if npy.is_file():
            images = TensorImages(np.load(npy, mmap_mode="r"), channels_last=True)
        elif self.root.is_dir() and image_files(self.root):
            images = self._dataset(self.root)
        else:
            raise not_found(self.name, [npy, f"{self.root}/**/*.png"], self.how_to_get)
        train, held_out = hold_out_as_original(images, self.val_size, self.split_seed)  # the original's split
        return train, held_out, held_out


class FFHQ1024DataModule(ImageFolderDataModule):
    """FFHQ at 1024x1024 from image folders `train/` and `valid/` (the valid set is also the test set)."""

    name = "ffhq1024"
    how_to_get = "put the FFHQ 1024x1024 images in data.root/train and data.root/valid"

    def load(self):
        train_dir, valid_dir = self.root / "train", self.root / "valid"
        if not (train_dir.is_dir() and valid_dir.is_dir()):
            raise not_found(self.name, [train_dir, valid_dir], self.how_to_get)
        valid = self._dataset(valid_dir)
        return self._dataset(train_dir), valid, valid
