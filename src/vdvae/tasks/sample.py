"""The sampling recipe behind sample.py: one `mode` per run, outputs in the run directory.

samples      grids at each of `temperatures` (no data needed)
reconstruct  images and their reconstructions from the first k groups, for each k in `ks`
interpolate  between consecutive pairs of images, in the posterior means of every group
encode       the images' latents to latents.pt (format: vdvae.sampling)
decode       images from a latents file (`latents=...`), the groups it lacks drawn at `temperatures[0]`
Images come from `inputs` (files or folders) or else from the checkpoint's test set. The model sees
`batch_size` images per pass (samples, reconstruct, encode, decode). Outputs appear whole or not at all.
"""

import logging
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vdvae import sampling
from vdvae.checkpoints import data_module, load_module
from vdvae.config import check_mode, no_run_dir_on_failure
from vdvae.data.base import first_images

log = logging.getLogger(__name__)


def input_images(cfg, vae, checkpoint, device):
    """uint8 images and model inputs: from `inputs`, else the first `n_images` of the test set."""
    datamodule, _ = data_module(checkpoint, cfg.ckpt_path, cfg.get("data"))
    if cfg.inputs:
        images = sampling.read_images(list(cfg.inputs), vae.image_size, vae.image_channels)[: cfg.n_images]
    else:
        datamodule.setup("test")
        images = first_images(datamodule.test_set, cfg.n_images)
    images = images.to(device)
    return images, datamodule.preprocess(images)[0]


def check_batch_size(value):
    """`batch_size`: a whole number of images per pass, or null (None) for the model's default."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"batch_size={value!r}: give a positive whole number of images per pass, or null")
    return value


def sample(cfg: DictConfig) -> list[Path]:
    # Everything that reads the request's files runs first: a mistake leaves no run directory behind.
    with no_run_dir_on_failure():
        check_mode(cfg)  # with the checkpoint, checked before the run directory exists, except in sweeps
        check_batch_size(cfg.batch_size)
        module, checkpoint = load_module(cfg.ckpt_path)
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = (module.ema if cfg.use_ema else module.vae).to(device)
        batch_size = cfg.batch_size or sampling.chunk_size(vae)
        if cfg.mode == "decode":
            latents = sampling.load_latents(vae, Path(cfg.latents))  # checked whole, kept on the CPU
        elif cfg.mode != "samples":
            images, inputs = input_images(cfg, vae, checkpoint, device)
            if cfg.mode == "interpolate" and len(images) < 2:
                raise ValueError(f"mode=interpolate needs two images or more; the inputs hold {len(images)}")
    out = Path(HydraConfig.get().runtime.output_dir)
    temperatures = OmegaConf.to_container(cfg.temperatures)
    torch.manual_seed(cfg.seed)
    if cfg.mode == "samples":
        return sampling.sample_grids(vae, cfg.n, temperatures, out, batch_size)
    if cfg.mode == "decode":
        images = sampling.decode_latents(vae, latents, temperatures[0], batch_size)
        return [sampling.save_grid(images, out / "decoded.png", len(images))]
    if cfg.mode == "reconstruct":
        groups = vae.n_groups
        ks = list(cfg.ks) if cfg.ks else sampling.default_ks(groups)
        log.info("rows: data, then k = %s of %d groups kept", ks, groups)
        return [sampling.reconstruction_grid(vae, images, inputs, ks, temperatures[0], out, batch_size)]
    if cfg.mode == "interpolate":
        rows = [sampling.interpolate(vae, inputs[i], inputs[i + 1], cfg.steps) for i in range(0, len(inputs) - 1, 2)]
        return [sampling.save_grid(torch.cat(rows), out / "interpolations.png", cfg.steps)]
    path = sampling.save_latents(vae, inputs, out / "latents.pt", cfg.ckpt_path, batch_size=batch_size)
    return [path, sampling.save_grid(images, out / "encoded_images.png", len(images))]
