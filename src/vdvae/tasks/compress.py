"""The compression recipe behind compress.py: a checkpoint as a lossless image codec (vdvae.compression).

mode=compress    images from `inputs` (files or folders, exactly the model's size and channels) or the
                 first `n_images` of the checkpoint's test split -> <run dir>/images.vdvae, report.json
mode=decompress  `file` -> <run dir>/images/<name>.png, bit for bit the images that were compressed

Outputs appear whole or not at all: the file and the report are written under temporary names moved into
place at the end, and the PNGs into a temporary folder renamed to images/ once all are written, so an
interrupted run leaves nothing that looks complete. Images that cannot be coded exactly (16-bit samples,
alpha, palettes, other colour spaces, several frames) are refused, named, before any work. On a terminal,
bars show the images coded, images/s and the time left (vdvae.progress); logs and pipes get none.
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from vdvae import run_folder
from vdvae.compression import (
    CodingOptions,
    CompressedFileError,
    codec_from_checkpoint,
    negative_elbo,
    png_name,
    read_compressed,
    read_file,
)
from vdvae.config import check_mode
from vdvae.data.base import first_images
from vdvae.data.folder import input_files
from vdvae.files import atomic_path, write_atomically
from vdvae.lifecycle import checked_before_start, no_run_dir_on_failure
from vdvae.progress import progress
from vdvae.sampling import pil_image

log = logging.getLogger(__name__)
# PIL modes read without loss as the model's channels: 1 -> grayscale, 3 -> RGB. Bilevel ('1') becomes
# 0 and 255 in L, and 2- or 4-bit grayscale is scaled to 8 bits by PIL: both one-to-one.
EXACT_MODES = {1: {"L": None, "1": "L"}, 3: {"RGB": None}}
# What to do with an image in another mode, by what the mode holds.
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}  # 16- or 32-bit integer or float samples


def read_exact_images(paths, shape) -> tuple[torch.Tensor, list[str]]:
    """uint8 (N, C, H, W) of image files (or every image in the folders given), unchanged: each must have
    the model's size and channels, since resizing or converting colours would not be lossless."""
    files = input_files(paths)
    channels, height, width = shape
    images = []
    for path in files:
        with _open_image(path) as file:
            if problem := inexact(file, shape):
                kind = "grayscale (L)" if channels == 1 else "RGB"
                raise ValueError(
                    f"inputs: {path} is a {file.size[0]}x{file.size[1]} {file.mode} image; this model compresses "
                    f"{width}x{height} {kind} images without loss: {problem}"
                )
            convert = EXACT_MODES[channels][file.mode]
            array = np.asarray(file.convert(convert) if convert else file)
        images.append(torch.from_numpy(array.copy()).reshape(height, width, channels).permute(2, 0, 1))
    return torch.stack(images), unique_names(files)


def _open_image(path: Path) -> Image.Image:
    """The image at `path`, its header read (not its pixels): a regular file of a size PIL accepts."""
    if not path.is_file():  # a FIFO named like an image would block, a device never end
        raise ValueError(f"inputs: {path} is not a regular file")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:  # not a ValueError: it would end in a traceback
        raise ValueError(f"inputs: {path}: {error}") from error


def inexact(file: Image.Image, shape) -> str | None:
    """Why the pixels of an opened image are not exactly an image of `shape` (C, H, W), and what to do;
    None if they are. Only the header is read."""
    channels, height, width = shape
    target = "L" if channels == 1 else "RGB"
    if getattr(file, "n_frames", 1) > 1:
        return f"it holds {file.n_frames} frames; save the one to compress as a single image first"
    if file.mode in WIDE_MODES or _wide_samples(file):
        return f"it has more than 8 bits per sample; convert it to 8-bit {target} first (which drops the low bits)"
    if file.mode in ALPHA_MODES or "transparency" in file.info:
        return f"its transparency would be lost; convert it to {target} first if nothing in it is transparent"
    if file.mode == "P":
        return f"it is a palette image; convert it to {target} first"
    if file.mode not in EXACT_MODES[channels]:
        return f"convert it to {target} first (a conversion of colours that this command does not make for you)"
    if file.size != (width, height):
        return "resize or crop it first"
    return None


def _wide_samples(file: Image.Image) -> bool:
    """PIL reads some images of 16-bit samples in an 8-bit mode, dropping the low bits (a 48-bit RGB PNG
    opens as RGB): the raw mode of its data says so."""
    for tile in getattr(file, "tile", None) or []:
        raw = tile[3][0] if isinstance(tile[3], tuple) and tile[3] else tile[3]  # (codec, extents, offset, args)
        if isinstance(raw, str) and any(wide in raw for wide in (";16", ";32", "I;", "F;")):
            return True
    return False


def unique_names(files) -> list[str]:
    """<stem>.png for each file, numbered where stems repeat (files from several folders)."""
    names, seen = [], set()
    for path in files:
        name, i = f"{path.stem}.png", 1
        while name in seen:
            name, i = f"{path.stem}_{i}.png", i + 1
        seen.add(name)
        names.append(name)
    return names


def compress(cfg: DictConfig) -> list[Path]:
    with no_run_dir_on_failure():
        if not checked_before_start():  # else checked with the checkpoint before the run directory existed
            check_mode(cfg)
        out = run_folder.current()
        if cfg.mode == "decompress":
            return decompress_file(cfg, out)
        return compress_images(cfg, out)


def decompress_file(cfg: DictConfig, out: Path) -> list[Path]:
    """`file` -> <out>/images/*.png. The file is read and its header checked (names included) before the
    checkpoint is loaded; the PNGs appear as images/ only when all are written."""
    header, words = read_file(read_compressed(str(cfg.file)))
    most = cfg.get("batch_size") or CodingOptions().batch_size
    if max(header["chunks"]) > most:  # a pass's memory: the file's chunks are decoded whole
        raise CompressedFileError(
            f"{cfg.file}: its images are coded in chunks of up to {max(header['chunks']):,} images, each decoded "
            f"in one pass, more than batch_size={most} allows: pass batch_size={max(header['chunks'])} where the "
            f"machine has the memory for it"
        )
    codec, _ = codec_from_checkpoint(cfg.ckpt_path, cfg.use_ema, cfg.get("data"))
    images, names = codec.decode(header, words)
    names = [png_name(n) for n in names] if names else [f"{i:05d}.png" for i in range(len(images))]
    folder = out / "images"
    with atomic_path(folder) as tmp, progress(len(images), "writing PNGs") as bar:
        tmp.mkdir()
        for image, name in zip(images, names, strict=True):
            pil_image(image).save(tmp / name, format="PNG")
            bar.update()
        if len(list(tmp.iterdir())) != len(names):
            raise CompressedFileError(
                f"{cfg.file}: some of its image names are one file on this file system (names differing only "
                f"in case?), so not every image could be written; decompress it on a case-sensitive file system"
            )
    log.info("decompressed %d images from %s into %s", len(images), cfg.file, folder)
    return [folder]


def compress_images(cfg: DictConfig, out: Path) -> list[Path]:
    """`inputs` or the test split -> <out>/images.vdvae and <out>/report.json, each written whole."""
    options = CodingOptions(cfg.bin_width, cfg.latent_range, cfg.batch_size)
    codec, datamodule = codec_from_checkpoint(cfg.ckpt_path, cfg.use_ema, cfg.get("data"))
    if cfg.inputs:
        images, names = read_exact_images(list(cfg.inputs), codec.shape)
    else:
        datamodule.setup("test")
        images, names = first_images(datamodule.test_set, cfg.n_images or len(datamodule.test_set)), None
    images = images[: cfg.n_images] if cfg.n_images else images
    names = names[: len(images)] if names else None
    data, report = codec.compress(images, options, names)
    elbo = negative_elbo(codec.vae, codec.preprocess, images)
    summary = {
        "checkpoint": str(cfg.ckpt_path),
        "images": report.images,
        "file_bytes": len(data),
        "bits_per_dim": report.bits_per_dim,
        "net_bits_per_dim": report.net_bits_per_dim,
        "initial_bits": report.initial_bits,
        "header_bits": report.header_bits,
        "elbo_bits_per_dim": elbo,
        "chunks": len(report.chunks),
        "options": asdict(options),
    }
    path = write_atomically(out / "images.vdvae", data)
    write_atomically(out / "report.json", json.dumps(summary, indent=1))
    log.info(
        "%d images -> %s: %d bytes, %.4f bits/dim (%.4f without the %d initial and %d header bits); negative ELBO "
        "%.4f bits/dim",
        report.images,
        path,
        len(data),
        report.bits_per_dim,
        report.net_bits_per_dim,
        report.initial_bits,
        report.header_bits,
        elbo,
    )
    return [path, out / "report.json"]
