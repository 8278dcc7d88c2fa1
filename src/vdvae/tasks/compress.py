"""The compression recipe behind compress.py: a checkpoint as a lossless image codec (vdvae.compression).

mode=compress    images from `inputs` (files or folders, exactly the model's size and channels) or the
                 first `n_images` of the checkpoint's test split -> <run dir>/images.vdvae, report.json
mode=decompress  `file` -> <run dir>/images/<name>.png, bit for bit the images that were compressed
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from vdvae.compression import CodingOptions, CompressedFileError, codec_from_checkpoint, negative_elbo
from vdvae.config import check_mode, no_run_dir_on_failure
from vdvae.data.base import first_images
from vdvae.data.folder import input_files
from vdvae.sampling import pil_image

log = logging.getLogger(__name__)
# PIL modes read without loss as the model's channels: 1 -> grayscale, 3 -> RGB.
EXACT_MODES = {1: {"L": None, "1": "L"}, 3: {"RGB": None}}


def read_exact_images(paths, shape) -> tuple[torch.Tensor, list[str]]:
    """uint8 (N, C, H, W) of image files (or every image in the folders given), unchanged: each must have
    the model's size and channels, since resizing or converting colours would not be lossless."""
    files = input_files(paths)
    channels, height, width = shape
    images = []
    for path in files:
        with Image.open(path) as file:
            if file.mode not in EXACT_MODES[channels] or file.size != (width, height):
                raise ValueError(
                    f"inputs: {path} is a {file.size[0]}x{file.size[1]} {file.mode} image; this model compresses "
                    f"{width}x{height} {'grayscale (L)' if channels == 1 else 'RGB'} images without loss"
                )
            convert = EXACT_MODES[channels][file.mode]
            array = np.asarray(file.convert(convert) if convert else file)
        images.append(torch.from_numpy(array.copy()).reshape(height, width, channels).permute(2, 0, 1))
    return torch.stack(images), unique_names(files)


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


def safe_name(name: str) -> str:
    """A PNG file name from a compressed file's header, inside the output folder whatever the header says."""
    base = Path(str(name)).name
    if not base or base in (".", "..") or "\x00" in base:
        raise CompressedFileError(f"the file names an image {name!r}, which is not a file name")
    return base if base.lower().endswith(".png") else f"{base}.png"


def compress(cfg: DictConfig) -> list[Path]:
    with no_run_dir_on_failure():
        check_mode(cfg)  # with the checkpoint, checked before the run directory exists, except in sweeps
        options = CodingOptions(cfg.bin_width, cfg.latent_range, cfg.batch_size)
        codec, datamodule = codec_from_checkpoint(cfg.ckpt_path, cfg.use_ema, cfg.get("data"))
        out = Path(HydraConfig.get().runtime.output_dir)
        if cfg.mode == "decompress":
            data = Path(cfg.file).read_bytes()
            images, names = codec.decompress(data)
            names = [safe_name(n) for n in names] if names else [f"{i:05d}.png" for i in range(len(images))]
            if len(set(names)) != len(names):
                raise CompressedFileError("the file names two images alike")
        elif cfg.inputs:
            images, names = read_exact_images(list(cfg.inputs), codec.shape)
        else:
            datamodule.setup("test")
            images, names = first_images(datamodule.test_set, cfg.n_images or len(datamodule.test_set)), None
    if cfg.mode == "decompress":
        folder = out / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for image, name in zip(images, names, strict=True):
            pil_image(image).save(folder / name, format="PNG")
        log.info("decompressed %d images from %s into %s", len(images), cfg.file, folder)
        return [folder]
    images = images[: cfg.n_images] if cfg.n_images else images
    names = names[: len(images)] if names else None
    data, report = codec.compress(images, options, names)
    path = out / "images.vdvae"
    path.write_bytes(data)
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
    (out / "report.json").write_text(json.dumps(summary, indent=1))
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
