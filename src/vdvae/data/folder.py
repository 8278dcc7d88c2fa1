"""Image folders: a generic one for custom data (any resolution), FFHQ-256 and FFHQ-1024.

A folder dataset reads every image file under a directory (recursively), converts it to 8-bit RGB or
grayscale (`pixels`: each image mode's conversion is in `SOURCES`, and in docs/training.md), and
resizes (shorter side) and centre-crops it to `image_size`. Every file's header is read at set-up: a
file that is not an image, or whose mode has no stated conversion, stops the run there, named; the
modes that will be converted are logged once, with how. Only regular files are read, and a file that
declares more than a still image of bounded size (`size_problem`), or holds less than it declares (a
truncated PNG or JPEG), is refused there too, before any pixel is decoded. Splits come from `train/`, `valid/` (or
`val/`) and `test/` subfolders where they exist; otherwise validation and test images are held out of
the training images at random.
"""

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vdvae.data.base import ImageDataModule, TensorImages, hold_out, hold_out_as_original, not_found

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

# How each mode a file opens in becomes 8-bit values: (grey or colour, what changes; None: nothing).
# The keys are Pillow's modes, and "<mode>;16" for 16-bit-per-channel PNGs that Pillow reads as 8-bit ones.
SIXTEEN_BITS = "16-bit values scaled to 8 bits as value >> 8 (the high byte)"
SOURCES = {
    "L": ("grey", None),
    "RGB": ("colour", None),
    "1": ("grey", "1-bit values 0 and 1 become 0 and 255"),
    "LA": ("grey", "alpha dropped (grey values kept as stored)"),
    "P": ("colour", "palette looked up (any transparency dropped)"),
    "PA": ("colour", "palette looked up, alpha dropped"),
    "RGBA": ("colour", "alpha dropped (colours kept as stored, not composited)"),
    "CMYK": ("colour", "Pillow's CMYK to RGB, (255 - C) * (255 - K) / 255, no colour profile"),
    "I;16": ("grey", SIXTEEN_BITS),
    "I;16B": ("grey", SIXTEEN_BITS),
    "I;16L": ("grey", SIXTEEN_BITS),
    "I;16N": ("grey", SIXTEEN_BITS),
    "I": ("grey", f"32-bit integers taken as 16-bit values, {SIXTEEN_BITS} (values outside 0..65535 refused)"),
    "LA;16": ("grey", f"{SIXTEEN_BITS}, alpha dropped"),
    "RGB;16": ("colour", SIXTEEN_BITS),
    "RGBA;16": ("colour", f"{SIXTEEN_BITS}, alpha dropped"),
}
# Then to the model's channels (data.channels: 3 = "RGB", 1 = "L").
TO_CHANNELS = {
    ("grey", "RGB"): "grey copied to R, G and B",
    ("colour", "L"): "colour to grey as Pillow does, L = (299 R + 587 G + 114 B) / 1000",
}


class UnsupportedImage(ValueError):
    """An image that opens, but whose values have no stated conversion to 8 bits."""


def mode_key(image: Image.Image) -> str:
    """The image's mode, as `SOURCES` names it: Pillow reads 16-bit RGB(A) and grey-alpha PNGs as 8-bit
    modes (keeping the high byte), which only the decoder's raw mode ("RGB;16B") tells apart."""
    rawmode = image.tile[0][3] if image.format == "PNG" and image.tile else None
    if not image.mode.startswith("I") and isinstance(rawmode, str) and (m := re.fullmatch(r"(\w+);16B?", rawmode)):
        return f"{m.group(1)};16"
    return image.mode


def conversion(key: str, target: str) -> str | None:
    """How an image of mode `key` becomes `target` ("RGB" or "L"), in words; None when it is read as stored."""
    kind, how = SOURCES[key]
    steps = [step for step in (how, TO_CHANNELS.get((kind, target))) if step]
    return "; ".join(steps) or None


def pixels(image: Image.Image, target: str, path) -> np.ndarray:
    """The image as 8-bit `target` ("RGB" or "L") pixels (H, W, C or H, W), converted as `SOURCES` says."""
    if image.mode not in SOURCES:
        raise UnsupportedImage(f"{path}: images of mode {image.mode} are not read; convert it to 8-bit RGB or grey")
    if image.mode.startswith("I"):  # Pillow's own conversion would clip every value above 255 to 255
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(f"{path}: mode {image.mode} with values outside 0..65535 (not 16-bit); convert it")
        image = Image.fromarray((values >> 8).astype(np.uint8), "L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # via RGBA: the palette's transparency is read, then dropped below
    if image.mode in ("RGBA", "CMYK"):
        image = image.convert("RGB")
    elif image.mode in ("LA", "1"):
        image = image.convert("L")
    return np.asarray(image.convert(target))


def image_files(directory: Path) -> list[Path]:
    """Every file under `directory` named as an image (each one is checked: `check_headers`)."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


# An image's sides may differ at most this much: resizing its shorter side to image_size makes the other at
# most this many times image_size (1 x 20,000,000 pixels would make a resize of gigabytes).
MAX_ASPECT = 16
# The most pixels a file may declare: Pillow's own limit against decompression bombs (about 89 million).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# How each format ends, where a complete file ends so (sought in its last bytes: trailing padding is allowed).
_ENDINGS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def size_problem(width: int, height: int) -> str | None:
    """Why an image of `width` x `height` pixels is not read (before its pixels are), or None."""
    if width < 1 or height < 1:
        return f"{width}x{height} pixels: no image"
    if width * height > MAX_PIXELS:
        return f"{width}x{height} pixels, more than {MAX_PIXELS:,}: resize it first"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width}x{height} pixels: its sides differ more than {MAX_ASPECT}-fold; crop it first"
    return None


def file_problem(path: Path, image: Image.Image) -> str | None:
    """Why an opened image file is not read, from its header and its last bytes (no pixels decoded): its
    size, several frames (an animation), or an end missing (a truncated file), or None."""
    problem = size_problem(*image.size)
    if problem:
        return problem
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        return f"animated, {frames} frames: only still images are read; save one frame of it"
    ending = _ENDINGS.get(image.format)
    if ending is not None:
        with open(path, "rb") as file:
            file.seek(max(file.seek(0, 2) - 4096, 0))
            if ending not in file.read():
                return f"truncated: the {image.format} file has no end; replace it with a complete copy"
    return None


def input_files(paths) -> list[Path]:
    """The files of an `inputs=[...]` option: image files as given, folders as every image under them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += image_files(p)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise ValueError(f"inputs: {p} is not a regular file or a folder (a pipe, a device?): not read")
        else:
            raise FileNotFoundError(f"inputs: {p} does not exist")
    if not files:
        raise FileNotFoundError(f"inputs: no images found in {[str(p) for p in paths]}")
    return files


def check_headers(files: list[Path], shown: int = 5) -> Counter:
    """Every file must open as an image (its header is read, not the pixels) of a mode with a stated
    conversion: a bad file stops the run at setup, named, instead of mid-epoch. Returns how many files
    there are of each mode (`mode_key`)."""
    bad, modes = [], Counter()
    for path in files:
        if not path.is_file():  # a pipe named x.png would block the run for ever
            bad.append(f"{path} (not a regular file: a pipe, a device or a broken link)")
            continue
        try:
            with Image.open(path) as image:
                key, problem = mode_key(image), file_problem(path, image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            bad.append(f"{path} ({type(error).__name__})")
            continue
        modes[key] += 1
        if problem:
            bad.append(f"{path} ({problem})")
        elif key not in SOURCES:
            bad.append(f"{path} (mode {key}: not read; convert it to 8-bit RGB or grey)")
    if bad:
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        raise ValueError(
            f"{len(bad)} of {len(files)} image files cannot be read (corrupt, not images, or of a mode not read); "
            f"remove or replace them:\n  " + "\n  ".join(bad[:shown]) + more
        )
    return modes


def log_conversions(where: str, modes: Counter, channels: int):
    """One warning for the images of `where` that are not read as stored: which modes, how many, and how."""
    target = "RGB" if channels == 3 else "L"
    converted = {key: conversion(key, target) for key in sorted(modes)}
    lines = [f"{key} ({modes[key]} file{'s' * (modes[key] > 1)}): {how}" for key, how in converted.items() if how]
    if lines:
        log.warning(
            "%s: %d of %d images are converted to 8-bit %s as they are read (see docs/training.md, "
            "'Image folders'):\n  %s",
            where,
            sum(modes[key] for key, how in converted.items() if how),
            sum(modes.values()),
            "RGB" if channels == 3 else "grey",
            "\n  ".join(lines),
        )


def checked_images(files: list[Path], image_size: int, channels: int, where: str) -> "FolderImages":
    """`files` as a dataset, every header checked first and the conversions logged once."""
    log_conversions(where, check_headers(files), channels)
    return FolderImages(files, image_size, channels)


class FolderImages(torch.utils.data.Dataset):
    """Image files decoded on access to uint8 (C, image_size, image_size), converted by `pixels`."""

    def __init__(self, files, image_size: int, channels: int):
        self.files, self.image_size = list(files), image_size
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as file:
                problem = size_problem(*file.size)  # checked at set-up; the file may have changed since
                if problem:
                    raise UnsupportedImage(f"{path}: {problem}")
                array = pixels(file, self.mode, path)
        except UnsupportedImage:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as error:
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
        self._modes += check_headers(files)
        return FolderImages(files, self.image_size, self.channels)

    how_to_get = "point data.root at a folder of images (or one with train/, valid/ and test/ subfolders)"

    def load(self):
        """The splits (`load_splits`), every file's header checked, and one warning for all the conversions."""
        self._modes = Counter()
        splits = self.load_splits()
        log_conversions(f"{self.name} ({self.root})", self._modes, self.channels)
        return splits

    def load_splits(self):
        if not self.root.is_dir():
            raise not_found(self.name, [self.root], self.how_to_get)
        train_dir = self._split_dir("train") or self.root
        train = self._dataset(train_dir)
        val_dir, test_dir = self._split_dir("valid", "val"), self._split_dir("test")
        test = self._dataset(test_dir) if test_dir else None
        if test is None and self.test_size:
            train, test = hold_out(train, self.test_size, self.split_seed + 1, "test_size")
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

    def load_splits(self):
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

    def load_splits(self):
        train_dir, valid_dir = self.root / "train", self.root / "valid"
        if not (train_dir.is_dir() and valid_dir.is_dir()):
            raise not_found(self.name, [train_dir, valid_dir], self.how_to_get)
        valid = self._dataset(valid_dir)
        return self._dataset(train_dir), valid, valid
