"""The sampling recipe behind sample.py: one `mode` per run, outputs in the run directory.

samples      grids at each of `temperatures` (no data needed)
reconstruct  images and their reconstructions from the first k groups, for each k in `ks`
interpolate  between consecutive pairs of images, in the posterior means of every group
encode       the images' latents to latents.pt (format: vdvae.sampling)
decode       images from a latents file (`latents=...`), the groups it lacks drawn at `temperatures[0]`
Images come from `inputs` (files or folders) or else from the checkpoint's test set.
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


def sample(cfg: DictConfig) -> list[Path]:
    # Everything that reads the request's files runs first: a mistake leaves no run directory behind.
    with no_run_dir_on_failure():
        check_mode(cfg)  # with the checkpoint, checked before the run directory exists, except in sweeps
        module, checkpoint = load_module(cfg.ckpt_path)
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = (module.ema if cfg.use_ema else module.vae).to(device)
        if cfg.mode == "decode":
            latents = sampling.load_latents(vae, Path(cfg.latents), device)
        elif cfg.mode != "samples":
            images, inputs = input_images(cfg, vae, checkpoint, device)
            if cfg.mode == "interpolate" and len(images) < 2:
                raise ValueError(f"mode=interpolate needs two images or more; the inputs hold {len(images)}")
    out = Path(HydraConfig.get().runtime.output_dir)
    temperatures = OmegaConf.to_container(cfg.temperatures)
    torch.manual_seed(cfg.seed)
    if cfg.mode == "samples":
        return sampling.sample_grids(vae, cfg.n, temperatures, out)
    if cfg.mode == "decode":
        return [sampling.save_grid(vae.decode(latents, temperatures[0]), out / "decoded.png", len(latents[0]))]
    if cfg.mode == "reconstruct":
        groups = vae.n_groups
        ks = list(cfg.ks) if cfg.ks else sampling.default_ks(groups)
        log.info("rows: data, then k = %s of %d groups kept", ks, groups)
        return [sampling.reconstruction_grid(vae, images, inputs, ks, temperatures[0], out)]
    if cfg.mode == "interpolate":
        rows = [sampling.interpolate(vae, inputs[i], inputs[i + 1], cfg.steps) for i in range(0, len(inputs) - 1, 2)]
        return [sampling.save_grid(torch.cat(rows), out / "interpolations.png", cfg.steps)]
    path = sampling.save_latents(vae, inputs, out / "latents.pt", cfg.ckpt_path)
    return [path, sampling.save_grid(images, out / "encoded_images.png", len(images))]
